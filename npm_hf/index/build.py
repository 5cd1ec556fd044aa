"""Resumable, multi-process index builds (`NPMIndex.build`, `npm-hf build-index [--resume]`).

A build works in a deterministic hidden directory next to the output, `.{name}.partial/`:

    index/                 the index directory being built (renamed into place at the end; manifest.json comes last)
    state/build.json       the build arguments and fingerprints of corpus, tokenizer and encoder (a resume with other
                           inputs is refused)
    state/tokenized.json   written once the corpus is tokenized: its counts and the resolved FAISS factory
    state/units/unit-N.npy the float16 vectors of work unit N (a run of `blocks_per_unit` blocks), each renamed into
                           place only once complete: what a resume keeps
    state/trained.faiss, state/parts/   IVF indexes: the trained empty index and one filled part per process
    state/*.done           finished stages (vectors assembled into the index's shards, FAISS index written)

Under `torchrun` / `accelerate launch` (or any initialized `torch.distributed` group) every process computes the
same plan from the files on disk: process 0 tokenizes, every process encodes the units `rank, rank + world_size, ...`
into its own unit files, and process 0 assembles them into the vector shards. Units begin at multiples of
`batch_size` blocks, so every forward pass sees the same blocks as in a one-process build. IVF indexes are trained
by process 0; each process adds its share of the vectors to a copy and writes a part, and process 0 merges the parts
with FAISS's on-disk merge into `index.faiss` + `index.ivfdata` (`npm_hf.inference.faiss_io.read_faiss_index` maps
the ivfdata found beside index.faiss, so the directory can move). Flat indexes are stored empty as always; other
indexes (HNSW) are filled by process 0.

The stages synchronise through `_Processes.run`: when one process fails the others raise too instead of waiting
forever. An interrupted build keeps its partial directory once the corpus is tokenized; `resume=True` (CLI
`--resume`) continues it, `overwrite=True` starts it over.
"""

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers.utils import logging

from ..corpus import is_stream
from ..inference.compact_tokens import COMPACT_TOKENS_FORMAT_VERSION
from ..inference.decoding import NPMDecodingConfig
from ..inference.directory_swap import PARTIAL_SUFFIX, DirectoryLock, recover
from ..inference.faiss_io import FAISS_ADD_CHUNK, add_vectors, core_index, extract_ivf, is_flat
from ..inference.index_files import (FAISS_FILE, IVFDATA_FILE, MANIFEST_FILE, POSITIONS_FILE, TOKEN_FILES,
                                     IndexManifest, NPMIndexError, encoder_fingerprint, sha256_file,
                                     tokenizer_fingerprint, write_encoder_sample)
from ..inference.vector_shards import (create_vector_shards, open_vector_shards,
                                       parse_shard_size, shard_layout)
from ..inference.vector_codes import NO_VECTORS
from .arguments import AUTO_FACTORY, IndexBuildArguments, check_refined_factory, parse_passage_settings
from .coded_build import coded_agreement, default_nprobe, stage_factories, suggest_refined_factory, write_codes
from .encoding import encode_into, index_rule, unit_blocks
from .faiss_build import (check_training_size, merge_on_disk, new_faiss_index, suggest_faiss_factory,
                          write_index_atomically)
from .memory import BuildMemoryPlan
from .passages import save_bm25_passages, save_dense_passages
from .writing import compact_token_files, library_versions, publish, write_corpus, write_positions


logger = logging.get_logger(__name__)

_STATE_FILE = "build.json"
_TOKENIZED_FILE = "tokenized.json"
_VECTORS_DONE = "vectors.done"
_FAISS_DONE = "faiss.done"
_PASSAGES_DONE = "passages.done"
_DENSE_FILE = "dense.json"  # the dense passage vectors are written: the settings stored
_COMPACT_DONE = "compact.done"
_CODES_FILE = "codes.json"  # vectors="none": the codes are written (their layout and the manifest's vector_codes)
# Arguments that shape the result (or the units already encoded): a resume must use the same ones.
_PLAN_ARGUMENTS = ("block_size", "batch_size", "blocks_per_unit", "faiss_factory", "max_memory", "train_sample_size",
                   "max_shard_size", "seed", "remove_stopwords", "index_all_tokens", "bm25_passages", "vectors",
                   "dense_passages")


def portable_name(name_or_path, output_dir: Path) -> str:
    """How the manifest names the encoder without a local absolute path (it travels to the Hub): a Hub id as it
    is; a local model directory relative to the index when the index lies inside it (`..` for `<model>/index`),
    else by its folder name only."""
    name = str(name_or_path or "")
    if not name or not os.path.isabs(name) and not os.path.exists(name):
        return name
    model_dir, index_dir = Path(name).resolve(), Path(output_dir).resolve()
    if index_dir.is_relative_to(model_dir):
        return Path(os.path.relpath(model_dir, index_dir)).as_posix()
    return model_dir.name


def partial_dir(output_dir) -> Path:
    """Where a build of `output_dir` keeps its work until it is published (hidden: it never loads as an index)."""
    output_dir = Path(output_dir)
    return output_dir.parent / f".{output_dir.name}{PARTIAL_SUFFIX}"


# ------------------------------------------------------------------------------------------------- processes
class _Processes:
    """This process's place in the build: rank and world size of the torch.distributed group (one process
    without one), and collective stages that fail together."""

    def __init__(self):
        self.created_group = False
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and dist.is_available() and not dist.is_initialized():
            # torchrun / accelerate launch leave this to the script. The processes only exchange "done / failed"
            # flags (the vectors go through files), so gloo serves CPUs and GPUs alike.
            # Long timeout: the other processes wait while process 0 tokenizes or merges a large corpus alone.
            dist.init_process_group(backend="gloo", timeout=datetime.timedelta(hours=24))
            self.created_group = True
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_ok(self, ok: bool) -> bool:
        """Whether every process reports ok (a barrier too)."""
        if not self.distributed:
            return ok
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([int(ok)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def run(self, stage, main_only: bool = False):
        """Run `stage()` (on process 0 only if `main_only`), then wait for every process; raise if any failed."""
        error, result = None, None
        try:
            if self.main or not main_only:
                result = stage()
        except BaseException as caught:  # noqa: B036 - re-raised below, after telling the other processes
            error = caught
        if not self.all_ok(error is None) and error is None:
            raise RuntimeError("Another process of the distributed index build failed; see its error above.")
        if error is not None:
            raise error
        return result

    def close(self) -> None:
        if self.created_group:
                dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ fingerprints
def corpus_fingerprint(corpus) -> str:
    """Identify a corpus without reading it twice: a file or directory by its files' names, sizes and modification
    times; a `datasets.Dataset` by its fingerprint; an in-memory list by its content. A stream (generator,
    `IterableDataset`: `npm_hf.corpus.is_stream`) gets a fingerprint of its own that no other corpus matches: it
    cannot be read again to check it, so a resume refuses it."""
    digest = hashlib.sha256()
    if is_stream(corpus):
        digest.update(f"stream:{uuid.uuid4().hex}".encode())
    elif isinstance(corpus, (str, os.PathLike)) and not os.path.exists(corpus):
        digest.update(f"hub dataset:{corpus}".encode())  # a name for datasets.load_dataset
    elif isinstance(corpus, (str, os.PathLike)):
        root = Path(corpus).resolve()
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            stat = path.stat()
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    elif hasattr(corpus, "_fingerprint"):
        digest.update(f"dataset:{corpus._fingerprint}".encode())
    elif hasattr(corpus, "values") and all(hasattr(split, "_fingerprint") for split in corpus.values()):
        digest.update(json.dumps({name: split._fingerprint for name, split in corpus.items()}).encode())  # DatasetDict
    else:
        for item in corpus:
            digest.update(json.dumps(item, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
    return digest.hexdigest()


def _build_state(model, tokenizer, corpus, args: IndexBuildArguments) -> dict:
    return {"arguments": {name: getattr(args, name) for name in _PLAN_ARGUMENTS},
            "corpus": corpus_fingerprint(corpus), "tokenizer": tokenizer_fingerprint(tokenizer),
            "encoder": encoder_fingerprint(model)}


def _check_same_build(stored: dict, current: dict, partial: Path) -> None:
    """Raise NPMIndexError naming what differs between the interrupted build and this one."""
    changes = [f"{name}={stored['arguments'].get(name)!r} -> {value!r}"
               for name, value in current["arguments"].items() if stored["arguments"].get(name) != value]
    changes += [f"the {what} changed" for what in ("corpus", "tokenizer", "encoder") if stored[what] != current[what]]
    if changes:
        raise NPMIndexError(
            f"Cannot resume the interrupted build in {partial}: {'; '.join(changes)}. Resume with the inputs and "
            "arguments it started with, or pass overwrite=True (CLI: --overwrite) instead of resume to start over."
        )


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------- the build
def build_index_directory(model, tokenizer, corpus, output_dir: Path, args: IndexBuildArguments) -> None:
    """Build (or, with `args.resume`, finish) the index at `output_dir`, in this process's share when several run
    (see the module docstring). Returns once the index is in place, on every process."""
    if args.resume and is_stream(corpus):
        raise ValueError(
            f"resume=True (CLI: --resume) needs a corpus that can be read again, but the corpus is a "
            f"{type(corpus).__name__}, read once as it streams: a resume could not check that it holds the same "
            "documents in the same order. Pass it as a .jsonl / .txt file, a saved dataset or a datasets.Dataset "
            "(e.g. load_dataset(..., streaming=False)) to make the build resumable, or pass overwrite=True "
            "instead of resume=True to start over."
        )
    processes = _Processes()
    if processes.main and processes.world_size > 1:
        logger.info(f"Building the index at {output_dir} with {processes.world_size} processes.")
    output_dir = Path(output_dir)
    try:
        with contextlib.ExitStack() as lock:
            # one writer per output: process 0 holds the lock for the whole build (the others fail with it)
            processes.run(lambda: lock.enter_context(DirectoryLock(output_dir, "build-index")), main_only=True)
            processes.run(lambda: recover(output_dir, MANIFEST_FILE), main_only=True)
            _build(processes, model, tokenizer, corpus, output_dir, args)
    finally:
        processes.close()


def _build(processes: _Processes, model, tokenizer, corpus, output_dir: Path, args: IndexBuildArguments) -> None:
    started = time.perf_counter()
    partial = partial_dir(output_dir)
    index_dir, state_dir = partial / "index", partial / "state"
    hidden_size = model.config.hidden_size
    if args.faiss_factory != AUTO_FACTORY:
        new_faiss_index(hidden_size, args.faiss_factory)  # a bad factory fails before any work
    processes.run(lambda: _prepare(partial, output_dir, model, tokenizer, corpus, args), main_only=True)
    try:
        processes.run(lambda: _tokenize(index_dir, state_dir, model, corpus, tokenizer, args), main_only=True)
    except BaseException:
        if processes.main and not (state_dir / _TOKENIZED_FILE).exists():
            shutil.rmtree(partial, ignore_errors=True)  # nothing worth resuming yet
        raise
    try:
        tokenized = json.loads((state_dir / _TOKENIZED_FILE).read_text())
        args = dataclasses.replace(args, train_sample_size=tokenized["train_sample_size"])  # as fitted to the budget
        fingerprints = json.loads((state_dir / _STATE_FILE).read_text())  # computed once, by _prepare
        layout = shard_layout(tokenized["num_indexed_tokens"], hidden_size, parse_shard_size(args.max_shard_size))
        coded = args.vectors == NO_VECTORS  # the float16 vectors stay in the state directory (`coded_build`)
        vectors_dir = state_dir / "vectors" if coded else index_dir
        factory, codec_factory = (stage_factories(tokenized["faiss_factory"]) if coded
                                  else (tokenized["faiss_factory"], None))
        if not (state_dir / _PASSAGES_DONE).exists():
            processes.run(lambda: _index_passages(index_dir, state_dir, tokenized.get("bm25_passages", []), args),
                          main_only=True)
        if not (state_dir / _VECTORS_DONE).exists():
            processes.run(lambda: _encode_units(processes, index_dir, state_dir, model, args))
            processes.run(lambda: _assemble_vectors(vectors_dir, state_dir, layout, hidden_size), main_only=True)
        if not (state_dir / _DENSE_FILE).exists():
            processes.run(lambda: _store_dense_passages(index_dir, state_dir, vectors_dir, layout, hidden_size,
                                                        tokenized.get("dense_passages", []), args), main_only=True)
        dense_passages = json.loads((state_dir / _DENSE_FILE).read_text())["stored"]
        if not (state_dir / _FAISS_DONE).exists():
            _build_faiss(processes, index_dir, state_dir, layout, hidden_size, factory, args, vectors_dir, coded)
        codes = None
        if coded:
            if not (state_dir / _CODES_FILE).exists():
                processes.run(lambda: _write_codes(index_dir, state_dir, vectors_dir, layout, hidden_size,
                                                   codec_factory, args), main_only=True)
            codes = json.loads((state_dir / _CODES_FILE).read_text())
        if not (state_dir / _COMPACT_DONE).exists():  # last: every stage before reads the plain token files
            processes.run(lambda: _compact_tokens(index_dir, state_dir, args), main_only=True)
        manifest = IndexManifest(
            format_version=COMPACT_TOKENS_FORMAT_VERSION,  # edits raise it to 4 (`segments`)
            encoder_fingerprint=fingerprints["encoder"],
            tokenizer_fingerprint=fingerprints["tokenizer"],
            encoder_name_or_path=portable_name(getattr(model, "name_or_path", ""), output_dir),
            hidden_size=hidden_size,
            block_size=args.block_size,
            faiss_factory=tokenized["faiss_factory"],
            num_documents=tokenized["num_documents"],
            num_skipped_empty_documents=tokenized["num_skipped_empty_documents"],
            num_tokens=tokenized["num_tokens"],
            num_indexed_tokens=tokenized["num_indexed_tokens"],
            num_blocks=-(-tokenized["num_tokens"] // args.block_size),
            build_seconds=round(time.perf_counter() - started, 3),
            versions=library_versions(),
            vector_shards=codes["layout"] if coded else layout,
            vector_dtype=NO_VECTORS if coded else "float16",
            vector_codes=codes["facts"] if coded else {},
            max_shard_bytes=parse_shard_size(args.max_shard_size),
            line_starts_marked=True,
            boundary_tokens_only=not args.index_all_tokens,
            stopwords_removed=args.remove_stopwords,
            paragraph_blocks=True,
            bm25_passages=tokenized.get("bm25_passages", []),
            dense_passages=dense_passages,
        )
        processes.run(lambda: _finish(partial, index_dir, output_dir, manifest, model), main_only=True)
    except BaseException:
        if processes.main and is_stream(corpus):  # a streamed corpus cannot be resumed: nothing worth keeping
            shutil.rmtree(partial, ignore_errors=True)
            logger.warning("The index build stopped. Its corpus was a stream, which a resume cannot read again, so "
                           "its partial work was removed; build again (or from a file, which can resume).")
        elif processes.main:
            logger.warning(f"The index build stopped; its work so far is kept in {partial}. Run the same build "
                           "with resume=True (CLI: --resume) to continue it, or overwrite=True to start over.")
        raise


def _write_codes(index_dir: Path, state_dir: Path, vectors_dir: Path, layout: list[dict], hidden_size: int,
                 codec_factory: str, args: IndexBuildArguments) -> None:
    """vectors="none": the refine codes of every vector, and the agreement they keep (measured against them)."""
    vectors = open_vector_shards(vectors_dir, layout, hidden_size)
    codes = write_codes(index_dir, vectors, codec_factory, hidden_size, args.train_sample_size, args.seed,
                        args.max_shard_size)
    codes["facts"].update(coded_agreement(index_dir, vectors, codes["layout"], codes["facts"], seed=args.seed))
    logger.info(f"Refine codes {codec_factory!r}: {codes['facts']['code_size']} bytes per token, top-1 agreement "
                f"with exact search {codes['facts']['top1_agreement']} ({codes['facts']['agreement_measured_on']}).")
    _write_json(state_dir / _CODES_FILE, codes)


def _compact_tokens(index_dir: Path, state_dir: Path, args: IndexBuildArguments) -> None:
    compact_token_files(index_dir, args.block_size)
    (state_dir / _COMPACT_DONE).touch()


def _prepare(partial: Path, output_dir: Path, model, tokenizer, corpus, args: IndexBuildArguments) -> None:
    """Check the output path, then start a partial directory, or check the one a resume continues."""
    if output_dir.exists() and not args.overwrite:
        raise FileExistsError(
            f"{output_dir} already exists. Pass overwrite=True (CLI: --overwrite) to replace it, or choose "
            "another output directory."
        )
    state = _build_state(model, tokenizer, corpus, args)
    state_file = partial / "state" / _STATE_FILE
    if partial.exists() and args.resume and state_file.is_file():
        _check_same_build(json.loads(state_file.read_text()), state, partial)
        logger.info(f"Resuming the interrupted index build in {partial}.")
        return
    if partial.exists():
        if not args.overwrite and not args.resume:
            raise FileExistsError(
                f"An interrupted build of {output_dir} is in {partial}. Pass resume=True (CLI: --resume) to continue "
                "it, or overwrite=True (CLI: --overwrite) to delete it and start over."
            )
        shutil.rmtree(partial)  # overwrite, or a resume of a build that had not recorded its state yet
    elif args.resume:
        logger.info(f"No interrupted build at {partial}; starting a new one.")
    (partial / "state" / "units").mkdir(parents=True)
    (partial / "index").mkdir()
    _write_json(state_file, state)


def _tokenize(index_dir: Path, state_dir: Path, model, corpus, tokenizer, args: IndexBuildArguments) -> None:
    """Tokenize the corpus into the index directory, write positions.npy, and fix the FAISS factory and its training
    sample within the memory budget (before any encoding)."""
    if (state_dir / _TOKENIZED_FILE).exists():
        return
    hidden_size = model.config.hidden_size
    stats = write_corpus(index_dir, corpus, tokenizer, args)
    write_positions(index_dir, np.load(index_dir / TOKEN_FILES["token_ids"], mmap_mode="r"),
                     np.load(index_dir / TOKEN_FILES["token_flags"], mmap_mode="r"), index_rule(args, tokenizer))
    num_vectors = len(np.load(index_dir / POSITIONS_FILE, mmap_mode="r"))
    memory = BuildMemoryPlan.measure(model, args, num_vectors, stats.num_documents)
    factory = args.faiss_factory
    if factory == AUTO_FACTORY and args.vectors == NO_VECTORS:
        factory = suggest_refined_factory(num_vectors, hidden_size)
        check_refined_factory(factory)
        logger.info(f"faiss_factory='auto' with vectors='none' chose {factory!r} for {num_vectors} vectors.")
    elif factory == AUTO_FACTORY:
        factory = suggest_faiss_factory(num_vectors, hidden_size, memory and memory.faiss_budget())
        logger.info(f"faiss_factory='auto' chose {factory!r} for {num_vectors} vectors.")
    stages = stage_factories(factory) if args.vectors == NO_VECTORS else (factory,)
    for stage in stages:  # vectors="none": the first stage and the coder are trained on the same sample
        faiss_index = new_faiss_index(hidden_size, stage)
        if memory is not None:  # refuses a factory that cannot fit; caps the training sample
            args = memory.fit(faiss_index, stage, args)
        check_training_size(faiss_index, stage, num_vectors, args.train_sample_size)
    shard_layout(num_vectors, hidden_size, parse_shard_size(args.max_shard_size))  # fails on a too small shard
    model_passages = NPMDecodingConfig.for_model(model).prefilter_passage_tokens
    _write_json(state_dir / _TOKENIZED_FILE, {
        "num_documents": stats.num_documents, "num_skipped_empty_documents": stats.num_skipped_empty,
        "num_tokens": stats.num_tokens, "num_indexed_tokens": num_vectors, "faiss_factory": factory,
        "train_sample_size": args.train_sample_size,
        "bm25_passages": parse_passage_settings(args.bm25_passages, model_passages),
        "dense_passages": parse_passage_settings(args.dense_passages, model_passages, name="dense_passages")})


def _store_dense_passages(index_dir: Path, state_dir: Path, vectors_dir: Path, layout: list[dict], hidden_size: int,
                          passages: list, args: IndexBuildArguments) -> None:
    """The passage vectors of the dense pre-filter saved with the index (`IndexBuildArguments.dense_passages`), from
    the exact vectors (also for vectors="none", whose float16 vectors are still in the state directory)."""
    if passages:
        logger.info(f"Storing the passage vectors of the dense pre-filter ({len(passages)} setting(s)).")
    vectors = open_vector_shards(vectors_dir, layout, hidden_size)
    stored = save_dense_passages(index_dir, args.block_size, vectors, hidden_size, passages)
    _write_json(state_dir / _DENSE_FILE, {"stored": stored})


def _index_passages(index_dir: Path, state_dir: Path, passages: list, args: IndexBuildArguments) -> None:
    """The BM25 pre-filters saved with the index (`IndexBuildArguments.bm25_passages`)."""
    if passages:
        logger.info(f"Indexing the passages for the BM25 pre-filter ({len(passages)} setting(s)).")
    save_bm25_passages(index_dir, args.block_size, passages)
    (state_dir / _PASSAGES_DONE).touch()


# ----------------------------------------------------------------------------------------------- encoding
def work_units(num_tokens: int, args: IndexBuildArguments) -> list[tuple[int, int]]:
    """Token ranges [start, stop) of the work units: runs of blocks_per_unit blocks (rounded up to whole batches,
    so that a unit's forward passes hold the same blocks as a one-process build's)."""
    span = unit_blocks(args) * args.block_size
    return [(lo, min(lo + span, num_tokens)) for lo in range(0, num_tokens, span)]


def _unit_file(state_dir: Path, unit: int) -> Path:
    return state_dir / "units" / f"unit-{unit:07d}.npy"


def _encode_units(processes: _Processes, index_dir: Path, state_dir: Path, model, args: IndexBuildArguments) -> None:
    """Encode this process's units that no earlier run finished, each into its own file."""
    ids = np.load(index_dir / TOKEN_FILES["token_ids"], mmap_mode="r")
    flags = np.load(index_dir / TOKEN_FILES["token_flags"], mmap_mode="r")
    positions = np.load(index_dir / POSITIONS_FILE, mmap_mode="r")
    units = work_units(len(ids), args)
    assigned = range(processes.rank, len(units), processes.world_size)
    mine = [u for u in assigned if not _unit_file(state_dir, u).exists()]
    if len(mine) < len(assigned):
        logger.info(f"Process {processes.rank}: {len(assigned) - len(mine)} of its {len(assigned)} work units were "
                    "encoded by an earlier run; encoding the rest.")
    quiet = dataclasses.replace(args, show_progress_bar=False)
    total = sum(units[u][1] - units[u][0] for u in mine)
    desc = "Encoding corpus" + (f" (process {processes.rank})" if processes.world_size > 1 else "")
    with tqdm(total=total, desc=desc, unit="tok", disable=not args.show_progress_bar or not processes.main) as bar:
        for u in mine:
            start, stop = units[u]
            lo, hi = np.searchsorted(positions, [start, stop])
            keep = np.zeros(stop - start, dtype=bool)
            keep[np.asarray(positions[lo:hi]) - start] = True  # the tokens _tokenize chose to index
            encode_unit(_unit_file(state_dir, u), model, ids[start:stop], flags[start:stop], keep, quiet)
            bar.update(stop - start)


def encode_unit(path: Path, model, ids, flags, keep: np.ndarray, args: IndexBuildArguments) -> None:
    """Write the vectors of the `keep` tokens of one unit to `path`, complete or not at all (a temporary name, then
    a rename)."""
    rows = int(keep.sum())
    tmp = path.with_name(path.name + ".tmp")
    vectors = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(rows, model.config.hidden_size))
    encode_into(vectors, 0, model, ids, flags, keep, args)
    vectors.flush()
    del vectors
    # its checksum first: a unit file present has one, which the assembly checks (a resume trusts no damaged unit)
    _write_text_atomically(_checksum_file(path), sha256_file(tmp))
    os.replace(tmp, path)


def _checksum_file(unit: Path) -> Path:
    return unit.with_name(unit.name + ".sha256")


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _check_unit(path: Path) -> None:
    """Raise NPMIndexError (and remove the unit, so that a resume encodes it again) unless `path` matches the
    checksum recorded when it was encoded."""
    recorded = _checksum_file(path).read_text().strip() if _checksum_file(path).is_file() else None
    if recorded != sha256_file(path):
        path.unlink()
        raise NPMIndexError(
            f"The encoded work unit {path} is corrupted ({'checksum mismatch' if recorded else 'no checksum'}); it "
            "was removed. Run the same build again with resume=True (CLI: --resume) to encode it again."
        )


def _assemble_vectors(index_dir: Path, state_dir: Path, layout: list[dict], hidden_size: int) -> None:
    """Copy the unit files, in order, into the vector shards in `index_dir` (the index's, or for vectors="none" the
    state directory's); then drop them."""
    index_dir.mkdir(exist_ok=True)
    vectors = create_vector_shards(index_dir, layout, hidden_size)
    row = 0
    for path in sorted((state_dir / "units").glob("unit-*.npy")):
        _check_unit(path)
        unit = np.load(path, mmap_mode="r", allow_pickle=False)
        for lo in range(0, len(unit), FAISS_ADD_CHUNK):
            chunk = unit[lo : lo + FAISS_ADD_CHUNK]
            vectors[row : row + len(chunk)] = chunk
            row += len(chunk)
    if row != len(vectors):
        raise NPMIndexError(f"The encoded units of {state_dir} hold {row} of {len(vectors)} vectors; the partial "
                            "build is damaged: start it over with overwrite=True (CLI: --overwrite).")
    vectors.flush()
    del vectors
    (state_dir / _VECTORS_DONE).touch()
    shutil.rmtree(state_dir / "units")


# -------------------------------------------------------------------------------------------------- FAISS
def merges_on_disk(faiss_index) -> bool:
    """Whether an index is built from per-process parts merged on disk: an IVF index (under pre-transforms or not)
    that needs training."""
    core = core_index(faiss_index)
    return (not faiss_index.is_trained and isinstance(core, faiss.IndexIVF)
            and not isinstance(core, faiss.IndexIVFPQR) and extract_ivf(faiss_index) is not None)


def _train(faiss_index, vectors, args: IndexBuildArguments) -> None:
    """Train on a seeded sample of at most train_sample_size stored vectors."""
    rng = np.random.default_rng(args.seed)
    sample = np.sort(rng.choice(len(vectors), size=min(len(vectors), args.train_sample_size), replace=False))
    faiss_index.train(np.asarray(vectors[sample], dtype=np.float32))


def _build_faiss(processes: _Processes, index_dir: Path, state_dir: Path, layout: list[dict], hidden_size: int,
                 factory: str, args: IndexBuildArguments, vectors_dir: Path, coded: bool = False) -> None:
    vectors = open_vector_shards(vectors_dir, layout, hidden_size)
    faiss_index = new_faiss_index(hidden_size, factory)
    nprobe = default_nprobe(faiss_index) if coded else None
    if nprobe:  # stored with the index: FAISS's default of 1 list misses most top-1s
        extract_ivf(faiss_index).nprobe = nprobe
    if merges_on_disk(faiss_index):
        _build_ivf_on_disk(processes, index_dir, state_dir, vectors, faiss_index, args)
    else:
        processes.run(lambda: _fill_in_memory(index_dir, vectors, faiss_index, args), main_only=True)
    processes.run(lambda: (state_dir / _FAISS_DONE).touch(), main_only=True)


def _fill_in_memory(index_dir: Path, vectors, faiss_index, args: IndexBuildArguments) -> None:
    """A flat index is stored empty (filled from the vectors on load); others are trained and filled here."""
    if not is_flat(faiss_index):
        if not faiss_index.is_trained:
            _train(faiss_index, vectors, args)
        add_vectors(faiss_index, vectors)
    faiss.write_index(faiss_index, str(index_dir / FAISS_FILE))


def _part_ranges(num_rows: int, world_size: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, num_rows, world_size + 1).astype(np.int64)
    return [(int(bounds[r]), int(bounds[r + 1])) for r in range(world_size)]


def _part_file(state_dir: Path, lo: int, hi: int) -> Path:
    return state_dir / "parts" / f"part-{lo:012d}-{hi:012d}.faiss"


def _build_ivf_on_disk(processes: _Processes, index_dir: Path, state_dir: Path, vectors, faiss_index,
                       args: IndexBuildArguments) -> None:
    """Train once, add each process's rows to its own copy (a part), merge the parts into index.ivfdata."""
    trained = state_dir / "trained.faiss"
    parts = [_part_file(state_dir, lo, hi) for lo, hi in _part_ranges(len(vectors), processes.world_size)]

    def train():
        (state_dir / "parts").mkdir(exist_ok=True)
        for stale in set((state_dir / "parts").iterdir()) - set(parts):  # parts of a resume with another world size
            stale.unlink()
        if not trained.exists():
            _train(faiss_index, vectors, args)
            write_index_atomically(faiss_index, trained)

    def add_my_part():
        lo, hi = _part_ranges(len(vectors), processes.world_size)[processes.rank]
        path = _part_file(state_dir, lo, hi)
        if path.exists():
            return
        part = faiss.read_index(str(trained))
        for start in range(lo, hi, FAISS_ADD_CHUNK):
            stop = min(start + FAISS_ADD_CHUNK, hi)
            part.add_with_ids(np.asarray(vectors[start:stop], dtype=np.float32), np.arange(start, stop))
        write_index_atomically(part, path)

    def merge():
        (index_dir / IVFDATA_FILE).unlink(missing_ok=True)  # a merge cut short by a kill
        merge_on_disk(faiss.read_index(str(trained)), parts, index_dir)

    processes.run(train, main_only=True)
    processes.run(add_my_part)
    processes.run(merge, main_only=True)


# ------------------------------------------------------------------------------------------------ publish
def _finish(partial: Path, index_dir: Path, output_dir: Path, manifest: IndexManifest, model) -> None:
    write_encoder_sample(index_dir, model)  # lets the model be recognised in another precision (fp16)
    publish(index_dir, output_dir, manifest)
    shutil.rmtree(partial, ignore_errors=True)
