"""Building, editing and opening reference-corpus indexes.

Opening and searching an index is `npm_hf.inference` (it travels with every saved model as remote code); this
package adds what only npm_hf does, each subject in its own module, imports going down the list:

    arguments     IndexBuildArguments
    encoding      which tokens are indexed, and encoding packed blocks into float16 vectors
    writing       the corpus files of a new index, the manifest with checksums, the swap into place
    faiss_build   FAISS factory choice, training checks, on-disk IVF merges
    memory        the build's memory plan against max_memory
    passages      the BM25 pre-filters saved with an index (written by builds and edits)
    quality       top-1 agreement of an approximate index with exact search (for its card)
    build         the resumable, multi-process build
    editing       adding and deleting documents
    store         NPMIndex: NPMIndexReader + build + edits
"""

from ..inference.directory_swap import DirectoryLock, IndexLockedError
from ..inference.faiss_io import read_faiss_index, streamed_exact_search
from ..inference.index_files import (MANIFEST_FILE, VECTORS_FILE, IndexManifest, IndexMismatchError, NPMIndexError,
                                     encoder_fingerprint, tokenizer_fingerprint)
from ..inference.reader import NPMIndexReader
from ..inference.vector_shards import ShardedArray, parse_memory_size, parse_shard_size, shard_layout
from .arguments import AUTO_FACTORY, IndexBuildArguments
from .encoding import encoding_plan, indexed_token_mask, padded_blocks
from .faiss_build import check_training_size, faiss_training_minimum, suggest_faiss_factory
from .memory import BuildMemoryPlan, process_resident_bytes
from .quality import top1_agreement
from .store import NPMIndex


__all__ = [
    "AUTO_FACTORY", "MANIFEST_FILE", "VECTORS_FILE", "BuildMemoryPlan", "DirectoryLock", "IndexBuildArguments",
    "IndexLockedError", "IndexManifest", "IndexMismatchError", "NPMIndex", "NPMIndexError", "NPMIndexReader",
    "ShardedArray", "check_training_size", "encoder_fingerprint", "encoding_plan", "faiss_training_minimum",
    "indexed_token_mask", "padded_blocks", "parse_memory_size", "parse_shard_size", "process_resident_bytes",
    "read_faiss_index", "shard_layout", "streamed_exact_search", "suggest_faiss_factory", "tokenizer_fingerprint",
    "top1_agreement",
]
