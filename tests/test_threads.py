"""One pipeline shared by several threads (a web server's workers) gives the answers it gives one call at a time."""

import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import npm_hf
from npm_hf.inference.index_files import DocumentStore


THREADS = 4
ROUNDS = 25  # per thread, over all texts: 4 x 25 x 8 = 800 calls


def _texts(mask):
    return [f"Texas borders {mask}.", f"Abraham Lincoln was born in {mask}.", f"The Rio Grande flows through {mask}.",
            f"{mask} is located in Thessaloniki.", f"Lincoln grew up on a farm in {mask}.",
            f"The Ohio River borders {mask}.", f"New Mexico is hot and {mask} in the summer.",
            f"Hagios Demetrios is the main sanctuary of {mask}."]


def _key(answers):
    return [(a["token_str"], round(a["score"], 6), a["evidence"]["doc_id"], a["evidence"]["start"]) for a in answers]


def _threaded(fill, jobs) -> list[tuple[int, list]]:
    """(job number, answer key) of every call when THREADS threads each run all `jobs` (text, call kwargs) ROUNDS
    times, each thread starting at another job so that different calls overlap."""
    def worker(seed):
        order = [(seed + j) % len(jobs) for j in range(len(jobs))]
        return [(j, _key(fill(jobs[j][0], **jobs[j][1]))) for _ in range(ROUNDS) for j in order]

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads every 10 us (default 5 ms): races show up within 800 calls
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            return [row for rows in pool.map(worker, range(THREADS)) for row in rows]
    finally:
        sys.setswitchinterval(interval)


def test_threads_sharing_a_pipeline_give_the_sequential_answers(npm_dir, mask, make_pipeline, monkeypatch):
    # a document cache of one entry: every call evicts, the shared state most exposed to races
    monkeypatch.setattr(DocumentStore, "_CACHE_SIZE", 1)
    fill = make_pipeline(npm_dir)
    jobs = [(text, {"top_k": 3}) for text in _texts(mask)]
    expected = [_key(fill(text, **kwargs)) for text, kwargs in jobs]
    assert all(expected) and len({str(e) for e in expected}) > 1
    results = _threaded(fill, jobs)
    assert len(results) == THREADS * ROUNDS * len(jobs)
    assert [j for j, key in results if key != expected[j]] == []


@pytest.fixture(scope="module")
def ivf_dir(tmp_path_factory, npm_dir, corpus):
    folder = tmp_path_factory.mktemp("threads") / "model"
    shutil.copytree(npm_dir, folder, ignore=shutil.ignore_patterns("index"))
    npm_hf.build_index(folder, corpus, args=npm_hf.IndexBuildArguments(block_size=16, faiss_factory="IVF2,Flat",
                                                                        show_progress_bar=False))
    return folder


def test_threads_with_different_nprobe_each_get_their_own(ivf_dir, mask, make_pipeline):
    """nprobe is a setting of the shared FAISS index: a call must never search with another thread's value."""
    fill = make_pipeline(ivf_dir)
    jobs = [(text, {"top_k": 5, "nprobe": nprobe}) for text in _texts(mask) for nprobe in (1, 2)]
    expected = [_key(fill(text, **kwargs)) for text, kwargs in jobs]
    assert any(expected[i] != expected[i + 1] for i in range(0, len(jobs), 2))  # nprobe changes some answers
    results = _threaded(fill, jobs)
    assert [j for j, key in results if key != expected[j]] == []


def test_a_document_store_shared_by_threads(tmp_path, monkeypatch):
    """Threads evicting from one small cache at once: without a lock two evicted the same entry (KeyError)."""
    lines = [json.dumps({"id": str(i), "title": "", "text": "x" * i}).encode() + b"\n" for i in range(50)]
    (tmp_path / "documents.jsonl").write_bytes(b"".join(lines))
    store = DocumentStore(tmp_path / "documents.jsonl", np.cumsum([0] + [len(line) for line in lines]))
    monkeypatch.setattr(DocumentStore, "_CACHE_SIZE", 2)

    def work(seed):
        return [store[(seed * 7 + r) % 50]["id"] == str((seed * 7 + r) % 50) for r in range(20000)]

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            assert all(all(ok) for ok in pool.map(work, range(THREADS)))
    finally:
        sys.setswitchinterval(interval)
