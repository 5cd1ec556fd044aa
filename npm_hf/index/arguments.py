"""How an index is built: `IndexBuildArguments` (`npm_hf.build_index`, `npm-hf build-index`)."""

from dataclasses import dataclass, field

from transformers.utils import logging

from ..hub_cards import HUB_MAX_FILE_BYTES
from ..inference.vector_codes import NO_VECTORS, VECTOR_CHOICES, split_refine
from ..inference.vector_shards import DEFAULT_MAX_SHARD_SIZE, parse_memory_size, parse_shard_size


logger = logging.get_logger(__name__)

AUTO_FACTORY = "auto"  # faiss_factory value: pick a factory from the corpus size and max_memory


@dataclass
class IndexBuildArguments:
    """How to build a reference-corpus index (`npm_hf.build_index`, `npm-hf build-index`)."""

    block_size: int = field(default=256, metadata={"help": "Tokens per encoded block (the paper uses 256)."})
    batch_size: int = field(default=16, metadata={"help": "Blocks encoded per forward pass."})
    faiss_factory: str = field(
        default="Flat",
        metadata={"help": "FAISS index_factory string, always with inner product (e.g. Flat, HNSW32, IVF1024,PQ64), "
                          "or 'auto' to pick one from the corpus size and --max-memory."},
    )
    max_memory: str | None = field(
        default=None,
        metadata={"help": "Memory budget of the whole build, e.g. 8GB or 512MiB: the process's resident memory "
                          "(interpreter, libraries, model weights, encoding batches, FAISS training sample and "
                          "index). The build caps the training sample to it and refuses, before encoding, a "
                          "faiss_factory that cannot fit; 'auto' picks a factory that fits. Memory-mapped files "
                          "(vectors, token arrays) are not counted: the kernel pages them in and out."},
    )
    train_sample_size: int = field(
        default=1_000_000, metadata={"help": "Vectors sampled to train FAISS indexes that need training."}
    )
    max_shard_size: int | str = field(
        default=DEFAULT_MAX_SHARD_SIZE,
        metadata={"help": "Largest vectors file, in bytes or as e.g. 500MB, 10GB or 2GiB; larger vectors are split "
                          "into vectors-00000-of-0000N.npy shards (the Hub refuses files above 50GB)."},
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace an existing index at the output path (and an interrupted build's partial work)."},
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue an interrupted build of the same output (kept in the hidden .NAME.partial "
                          "directory beside it) from the work units it finished."},
    )
    blocks_per_unit: int = field(
        default=256,
        metadata={"help": "Blocks per resumable work unit (rounded up to whole batches): what a process encodes "
                          "and saves at a time, and what a resumed build does not encode again."},
    )
    show_progress_bar: bool = field(default=True, metadata={"help": "Show tqdm progress bars."})
    seed: int = field(default=0, metadata={"help": "Seed of the FAISS training sample."})
    remove_stopwords: bool = field(
        default=False,
        metadata={"help": "Leave stop-word and punctuation ids out of the index (the paper's open-set datastore, "
                          "`npm_hf.inference.stopwords.reference_stopword_ids`): they are in neither softmax. The "
                          "paper protocol's open-set evaluation needs such an index."},
    )
    bm25_passages: str = field(
        default="auto",
        metadata={"help": "BM25 pre-filters to save with the index, so that prefilter='bm25' loads them "
                          "memory-mapped instead of indexing every passage text at start-up: 'auto' (over blocks, and "
                          "over the windows of the model's prefilter_passage_tokens if it sets them), 'none', or a "
                          "comma-separated list of 'blocks' and window sizes, e.g. 'blocks,64'."},
    )
    dense_passages: str = field(
        default="auto",
        metadata={"help": "Passage vectors of the dense pre-filter to store with the index (one byte per dimension "
                          "and passage), so that prefilter='dense' reads them instead of every token vector: the "
                          "same choices as bm25_passages."},
    )
    vectors: str = field(
        default="float16",
        metadata={"help": "'float16' (every indexed token's vector on disk, candidates re-scored exactly) or 'none': "
                          "no vectors, candidates re-scored from the codes of the factory's refine stage, e.g. "
                          "'IVF1024,PQ16np,Refine(SQ8)' (docs/index_format.md#indexes-without-vectors); with "
                          "faiss_factory='auto' a refined IVF-PQ is chosen."},
    )
    index_all_tokens: bool = field(
        default=False,
        metadata={"help": "Index mid-word pieces too (npm_hf before 0.2). By default only word starts and word ends "
                          "get a vector, as in the official datastore: the others can never start or end an answer."},
    )

    def __post_init__(self):
        for name in ("block_size", "batch_size", "train_sample_size", "blocks_per_unit"):
            if getattr(self, name) < 1:
                raise ValueError(f"IndexBuildArguments.{name} must be >= 1, got {getattr(self, name)}.")
        if self.block_size < 3:
            raise ValueError(
                f"IndexBuildArguments.block_size must be >= 3 (room for special tokens), got {self.block_size}."
            )
        if self.resume and self.overwrite:
            raise ValueError(
                "IndexBuildArguments: resume=True continues an interrupted build and overwrite=True deletes it; pass "
                "one of them (CLI: --resume or --overwrite), not both."
            )
        for name in ("bm25_passages", "dense_passages"):  # a malformed list fails here
            parse_passage_settings(getattr(self, name), name=name)
        if not self.faiss_factory.strip():
            raise ValueError("IndexBuildArguments.faiss_factory must be a FAISS factory string such as 'Flat'.")
        if self.vectors not in VECTOR_CHOICES:
            raise ValueError(f"IndexBuildArguments.vectors={self.vectors!r}; use 'float16' or 'none' (CLI: --vectors).")
        if self.vectors == NO_VECTORS and self.faiss_factory != AUTO_FACTORY:
            check_refined_factory(self.faiss_factory)
        if self.max_memory is not None:
            parse_memory_size(self.max_memory)  # a malformed size fails here, before any work
        if parse_shard_size(self.max_shard_size) > HUB_MAX_FILE_BYTES:
            logger.warning(f"max_shard_size={self.max_shard_size!r} allows vector files above the Hub's 50 GB "
                           "per-file limit; such an index cannot be pushed to the Hub.")


# what the warnings and errors of vectors="none" suggest (the agreement of each kind: docs/compact_index.md)
SUGGESTED_REFINED_FACTORY = "IVF1024,PQ16np,Refine(SQ8)"


def check_refined_factory(factory: str) -> None:
    """For vectors="none": refuse a flat first stage (it would need the vectors), warn without a refine stage."""
    base, codec = split_refine(factory)
    if base.replace(" ", "") in ("Flat", "IDMap,Flat"):
        raise ValueError(
            f"faiss_factory={factory!r} with vectors='none': a Flat first stage is exact search over the float "
            f"vectors, which this index does not keep. Use a compressed first stage with a refine stage, e.g. "
            f"'{SUGGESTED_REFINED_FACTORY}', or keep vectors='float16'."
        )
    if codec is None:
        logger.warning(
            f"faiss_factory={factory!r} has no refine stage: with vectors='none' its candidates are re-scored from "
            f"its own coarse codes, and its answers will often differ from exact search (top-1 agreement well "
            f"below 95 %, docs/index_format.md). Add one, e.g. '{SUGGESTED_REFINED_FACTORY}' (CLI: --faiss-factory)."
        )


def parse_passage_settings(value: str, model_passage_tokens: int | None = None, name: str = "bm25_passages") -> list:
    """`bm25_passages` or `dense_passages` (`name`) as a list of passage settings (None: blocks; N: N-token
    windows), without repeats."""
    text = str(value).strip().lower()
    if text == "none":
        return []
    if text == "auto":
        return [None] if model_passage_tokens is None else [None, model_passage_tokens]
    passages = []
    for item in (part.strip() for part in text.split(",")):
        if item == "blocks":
            passage = None
        elif item.isdigit() and int(item) >= 2:
            passage = int(item)
        else:
            raise ValueError(f"IndexBuildArguments.{name}={value!r}: each item must be 'blocks' or a window "
                             "size >= 2 (e.g. 'blocks,64'); or use 'auto' or 'none'.")
        if passage not in passages:
            passages.append(passage)
    return passages
