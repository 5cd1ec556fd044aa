"""The memory plan of a build: what encoding and FAISS need, stage by stage, against `max_memory`."""

import dataclasses
import os
from dataclasses import dataclass

from transformers.utils import logging

from ..inference.faiss_io import FAISS_ADD_CHUNK, FLAT_FILL_MAX_VECTORS, core_index, extract_ivf, is_flat
from ..inference.vector_shards import parse_memory_size
from .arguments import IndexBuildArguments
from .faiss_build import suggest_faiss_factory


logger = logging.get_logger(__name__)

# float32 bytes per dimension of each training vector at the peak of FAISS training: the float16 gather (2), its
# float32 copy (4), and the residuals IVF codecs train on (4).
TRAIN_BYTES_PER_DIM = 10


# Resident bytes the tokenizing stage of a build adds per character of its longest document (measured: 19 for a
# 50 MB one-line Wikipedia document, docs/benchmarks.md): the text, its JSON line and its token records.
TOKENIZE_BYTES_PER_CHAR = 20


def check_document_fits(document: dict, budget: int | None) -> None:
    """Raise ValueError, before tokenizing it, for a document whose tokenizing would not fit `budget` bytes of
    resident memory (None: no budget)."""
    if budget is None:
        return
    resident = process_resident_bytes()
    needed = TOKENIZE_BYTES_PER_CHAR * len(document["text"])
    if resident is not None and resident + needed > budget:
        raise ValueError(
            f"Document {document['id']!r} has {len(document['text'])} characters: tokenizing it needs about "
            f"{format_bytes(needed)} on top of the {format_bytes(resident)} resident, more than "
            f"max_memory={format_bytes(budget)}. Split it into several documents (or paragraphs: a line break "
            "starts one), or raise max_memory (CLI: --max-memory)."
        )


def process_resident_bytes() -> int | None:
    """Resident memory of this process now (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def format_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000:
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1000
    return f"{size:.1f}TB"


def encoding_peak_bytes(config, batch_size: int, block_size: int) -> int:
    """Activations of one inference forward pass of a BERT-like encoder over `batch_size` blocks (float32): the
    largest layer's hidden states, attention scores and feed-forward, plus the kept last hidden state."""
    config = getattr(config, "encoder", config)
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    heads = getattr(config, "num_attention_heads", None) or max(1, hidden // 64)
    return 4 * batch_size * block_size * (8 * hidden + 2 * intermediate + 3 * heads * block_size)


def faiss_memory_bytes(index, num_vectors: int) -> int:
    """RAM a FAISS index over `num_vectors` vectors takes while a build fills and writes it. A flat index is
    stored empty: it costs its float32 copy when the build's reload fills it (up to FLAT_FILL_MAX_VECTORS)."""
    d = index.d
    if is_flat(index):
        return 4 * d * num_vectors if num_vectors <= FLAT_FILL_MAX_VECTORS else 0
    ivf = extract_ivf(index)
    if ivf is not None:
        return num_vectors * (ivf.code_size + 8) + faiss_memory_bytes(ivf.quantizer, ivf.nlist)
    core = core_index(index)
    if hasattr(core, "hnsw"):
        storage = core_index(core.storage)
        links = 4 * core.hnsw.nb_neighbors(0) * 1.1 + 16  # level-0 links, upper levels (~1/M of the nodes), offsets
        return int(num_vectors * (getattr(storage, "code_size", 4 * d) + links))
    return num_vectors * getattr(core, "code_size", 4 * d)


@dataclass
class BuildMemoryPlan:
    """The resident memory a build needs, stage by stage, against its budget (`IndexBuildArguments.max_memory`)."""

    budget: int
    baseline: int  # the process before encoding: interpreter, libraries, the model's weights
    encoding: int  # activations of one batch
    metadata: int  # document offsets (the token arrays and positions are memory-mapped)
    num_vectors: int
    hidden_size: int

    @classmethod
    def measure(cls, model, args: IndexBuildArguments, num_vectors: int, num_documents: int):
        """The plan of a build of `num_vectors` vectors, or None without a budget. Raises ValueError when the
        budget cannot hold encoding at all."""
        if args.max_memory is None:
            return None
        weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        plan = cls(budget=parse_memory_size(args.max_memory), baseline=process_resident_bytes() or weights,
                   encoding=encoding_peak_bytes(model.config, args.batch_size, args.block_size),
                   metadata=48 * num_documents, num_vectors=num_vectors, hidden_size=model.config.hidden_size)
        if plan.available() < 0:
            fixed = plan.baseline + plan.encoding + plan.metadata
            raise ValueError(
                f"max_memory={args.max_memory} is less than encoding alone needs: {format_bytes(plan.baseline)} "
                f"already resident (interpreter, libraries, the model's {format_bytes(weights)} of weights) + "
                f"{format_bytes(plan.encoding)} of activations for batch_size={args.batch_size} blocks of "
                f"{args.block_size} tokens + {format_bytes(plan.metadata)} of document offsets. Raise "
                f"max_memory (CLI: --max-memory) to at least {format_bytes(fixed)}, more for FAISS, or lower "
                "batch_size (--batch-size)."
            )
        return plan

    def available(self) -> int:
        """Bytes left for FAISS (training sample, or index plus one add chunk) after the fixed costs."""
        return self.budget - self.baseline - self.encoding - self.metadata

    def add_chunk(self) -> int:
        return min(self.num_vectors, FAISS_ADD_CHUNK) * self.hidden_size * 6  # float16 rows + float32 copy

    def faiss_budget(self) -> int:
        """What faiss_factory='auto' may spend on the index, keeping room for one add chunk."""
        return max(self.available() - self.add_chunk(), 1)

    def fit(self, index, factory: str, args: IndexBuildArguments) -> IndexBuildArguments:
        """`args` with train_sample_size capped to what the budget holds (with a warning); ValueError when
        `index` itself cannot fit, naming a factory that would."""
        needed = faiss_memory_bytes(index, self.num_vectors) + self.add_chunk()
        if needed > self.available():
            try:
                hint = (f"'{suggest_faiss_factory(self.num_vectors, self.hidden_size, self.faiss_budget())}' fits "
                        "(or pass faiss_factory='auto', CLI: --faiss-factory auto)")
            except ValueError:
                hint = "no FAISS index fits"
            raise ValueError(
                f"The FAISS index {factory!r} over {self.num_vectors} vectors needs about {format_bytes(needed)} of "
                f"RAM, but max_memory={format_bytes(self.budget)} leaves {format_bytes(self.available())} after "
                f"the process ({format_bytes(self.baseline)}), encoding ({format_bytes(self.encoding)}) and "
                f"document offsets ({format_bytes(self.metadata)}): {hint}. Raise max_memory (CLI: --max-memory) "
                "or choose a smaller index."
            )
        if index.is_trained:
            return args
        fitting = max(self.available() // (TRAIN_BYTES_PER_DIM * self.hidden_size), 1)
        if fitting >= min(args.train_sample_size, self.num_vectors):
            return args
        logger.warning(f"Training FAISS on {fitting} sampled vectors instead of train_sample_size="
                       f"{args.train_sample_size}: more would not fit max_memory={format_bytes(self.budget)}.")
        return dataclasses.replace(args, train_sample_size=int(fitting))
