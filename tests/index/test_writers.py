"""One writer at a time (a real OS lock held by another process), and swaps that a kill between their two renames
leaves recoverable: finished on the next load or edit when the new index was complete, rolled back otherwise."""

import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from npm_hf import IndexBuildArguments, NonparametricFillMaskPipeline, NPMIndex, NPMIndexError
from npm_hf.cli import main
from npm_hf.inference.directory_swap import IndexLockedError, lock_path


NEW = {"id": "zorb", "title": "Borvin", "text": "Borvin lives in Saltoria. Saltoria is cold."}
QUIET = {"show_progress_bar": False, "block_size": 16}


def _python(script: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def holder(tmp_path):
    """Start another process that takes the writer lock of a directory and holds it until killed."""
    started = []

    def hold(directory):
        ready = tmp_path / f"ready-{len(started)}"
        process = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
            import sys, time
            from pathlib import Path
            from npm_hf.inference.directory_swap import DirectoryLock
            with DirectoryLock(sys.argv[1], "build-index"):
                Path(sys.argv[2]).touch()
                time.sleep(120)
            """), str(directory), str(ready)])
        started.append(process)
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert process.poll() is None and time.monotonic() < deadline, "the lock holder did not start"
            time.sleep(0.05)
        return process

    yield hold
    for process in started:
        process.kill()
        process.wait(timeout=30)


@pytest.fixture
def index_dir(tmp_path, npm_dir):
    copy = tmp_path / "index"
    shutil.copytree(npm_dir / "index", copy)
    return copy


def test_a_second_build_is_refused_while_the_first_holds_the_lock(tmp_path, model_and_tokenizer, corpus, holder):
    model, tokenizer = model_and_tokenizer
    output = tmp_path / "built"
    first = holder(output)
    for options in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(IndexLockedError,
                           match=rf"being written by another process \(pid {first.pid} .*build-index"):
            NPMIndex.build(model, tokenizer, corpus, output, IndexBuildArguments(**QUIET, **options))
    assert sorted(os.listdir(tmp_path)) == [".built.lock", "ready-0"]  # nothing of the refused builds
    first.kill()
    first.wait(timeout=30)
    built = NPMIndex.build(model, tokenizer, corpus, output, IndexBuildArguments(**QUIET))  # the stale lock is taken
    assert built.manifest.num_documents == 5
    assert not lock_path(output).exists()  # released: a clean writer leaves no lock file


def test_a_stale_lock_is_named(tmp_path, model_and_tokenizer, corpus, holder, caplog):
    from transformers.utils import logging as hf_logging

    model, tokenizer = model_and_tokenizer
    first = holder(tmp_path / "built")
    first.kill()
    first.wait(timeout=30)
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            NPMIndex.build(model, tokenizer, corpus, tmp_path / "built", IndexBuildArguments(**QUIET))
    finally:
        hf_logging.disable_propagation()
    assert f"stale writer lock on {tmp_path / 'built'} (pid {first.pid} " in caplog.text


def test_edits_wait_for_no_one_and_change_nothing_while_locked(index_dir, model_and_tokenizer, holder, capsys,
                                                                npm_dir):
    model, tokenizer = model_and_tokenizer
    index = NPMIndex.load(index_dir)
    before = sorted(os.listdir(index_dir)), (index_dir / "manifest.json").read_bytes()
    other = holder(index_dir)
    with pytest.raises(IndexLockedError, match=f"pid {other.pid}"):
        index.add_documents(model, tokenizer, [NEW])
    with pytest.raises(IndexLockedError, match=f"pid {other.pid}"):
        index.delete_documents(["texas"])
    assert main(["index", "delete", "--index", str(index_dir), "--ids", "texas"]) == 2
    assert f"pid {other.pid}" in capsys.readouterr().err
    assert (sorted(os.listdir(index_dir)), (index_dir / "manifest.json").read_bytes()) == before


def test_an_edit_from_a_stale_view_is_refused(index_dir, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    first, second = NPMIndex.load(index_dir), NPMIndex.load(index_dir)
    first.add_documents(model, tokenizer, [NEW])
    with pytest.raises(NPMIndexError, match="changed on disk since it was loaded.*Load the index again"):
        second.delete_documents(["texas"])
    assert "zorb" in {NPMIndex.load(index_dir).documents[i]["id"] for i in range(6)}  # the first edit survives


_KILLED_BETWEEN_RENAMES = """
    import os, signal, sys
    from transformers import AutoTokenizer
    from npm_hf import NPMIndex, NPMModel
    real_replace = os.replace

    def replace(source, target):  # the swap's first rename retires the old index: die right after it
        real_replace(source, target)
        if ".old-" in os.fspath(target):
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace
    model, tokenizer = NPMModel.from_pretrained(sys.argv[1]), AutoTokenizer.from_pretrained(sys.argv[1])
    index = NPMIndex.load(sys.argv[2])
    if sys.argv[3] == "add":
        index.add_documents(model, tokenizer, [{"id": "zorb", "title": "Borvin", "text": "Borvin lives in Saltoria."}])
    else:
        index.delete_documents(["texas"])
"""


@pytest.mark.parametrize("edit", ["add", "delete"])
def test_an_edit_killed_between_its_renames_is_finished_on_load(edit, index_dir, npm_dir, caplog):
    from transformers.utils import logging as hf_logging

    result = _python(_KILLED_BETWEEN_RENAMES, npm_dir, index_dir, edit)
    assert result.returncode == -9, result.stderr  # SIGKILL, between the renames
    left = sorted(p.name.split("-")[0] for p in index_dir.parent.iterdir() if p.name.startswith(".index"))
    assert not index_dir.exists() and left == [".index.lock", ".index.old", ".index.tmp"]
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            index = NPMIndex.load(index_dir, verify="full")
    finally:
        hf_logging.disable_propagation()
    assert "killed between the two renames of its swap; finished it" in caplog.text
    ids = {index.documents[i]["id"] for i in range(len(index.documents)) if not index.documents[i].get("deleted")}
    assert ("zorb" in ids) if edit == "add" else ("texas" not in ids)
    assert sorted(p.name for p in index_dir.parent.iterdir()) == ["index"]  # leftovers and the stale lock gone


def test_a_swap_killed_before_the_new_index_was_complete_rolls_back(index_dir, model_and_tokenizer, mask):
    model, tokenizer = model_and_tokenizer
    expected = NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=NPMIndex.load(index_dir))(
        f"Hagios Demetrios is located in {mask}.", top_k=3)
    staging = index_dir.parent / ".index.tmp-0123456789ab"
    shutil.copytree(index_dir, staging)
    os.remove(staging / "manifest.json")  # not complete: the manifest is written last
    os.replace(index_dir, index_dir.parent / ".index.old-0123456789ab")
    index = NPMIndex.load(index_dir)
    fill = NonparametricFillMaskPipeline(model=model, tokenizer=tokenizer, index=index)
    assert fill(f"Hagios Demetrios is located in {mask}.", top_k=3) == expected
    assert sorted(p.name for p in index_dir.parent.iterdir()) == ["index"]


def test_the_next_edit_removes_what_killed_edits_left(index_dir, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    for name in (".index.tmp-aaaaaaaaaaaa", ".index.old-bbbbbbbbbbbb"):
        shutil.copytree(index_dir, index_dir.parent / name)
    NPMIndex.load(index_dir).add_documents(model, tokenizer, [NEW])
    assert sorted(p.name for p in index_dir.parent.iterdir()) == ["index"]


def test_a_build_killed_between_its_renames_is_finished_by_the_next_build(tmp_path, model_and_tokenizer, corpus):
    model, tokenizer = model_and_tokenizer
    output = tmp_path / "built"
    NPMIndex.build(model, tokenizer, corpus[:2], output, IndexBuildArguments(**QUIET))
    shutil.copytree(output, tmp_path / ".built.partial" / "index")  # a finished --overwrite build, killed ...
    os.replace(output, tmp_path / ".built.old-0123456789ab")  # ... right after retiring the old index
    rebuilt = NPMIndex.build(model, tokenizer, corpus, output, IndexBuildArguments(**QUIET, overwrite=True))
    assert rebuilt.manifest.num_documents == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built"]


def test_the_cli_names_the_holder_of_the_lock(tmp_path, npm_dir, holder, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Texas is big.\n")
    other = holder(tmp_path / "built")
    assert main(["build-index", "--model", str(npm_dir), "--corpus", str(corpus), "--output",
                 str(tmp_path / "built"), "--block-size", "16", "--no-show-progress-bar"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "Traceback" in line or "error" in line]
    assert len(errors) == 1 and errors[0].startswith("npm-hf build-index: error: ")
    assert f"pid {other.pid}" in errors[0] and "Wait for it to finish" in errors[0]


def test_another_thread_of_the_same_process_is_refused_too(index_dir, model_and_tokenizer):
    import threading

    from npm_hf.inference.directory_swap import DirectoryLock

    model, tokenizer = model_and_tokenizer
    index, errors = NPMIndex.load(index_dir), []

    def edit():
        try:
            index.delete_documents(["texas"])
        except IndexLockedError as error:
            errors.append(str(error))

    with DirectoryLock(index_dir, "index edit"):
        with DirectoryLock(index_dir, "nested"):  # re-entrant in its own thread
            worker = threading.Thread(target=edit)
            worker.start()
            worker.join(timeout=60)
    assert len(errors) == 1 and f"pid {os.getpid()}" in errors[0]
    index.delete_documents(["texas"])  # free again
