"""NPM training blocks: a corpus cut into blocks, in groups that form one contrastive batch, written to an Arrow file.

The blocks stream from the corpus to a memory-mapped `datasets.Dataset` chunk by chunk, so neither the corpus nor
its blocks need to fit in memory: what stays resident is one chunk of blocks and one tokenizer batch. The file is
named by its content (`blocks-<sha256>.arrow` in `cache_dir`), written under a temporary name and renamed when
complete: the same corpus and settings give the same file, and a half-written file is never read.
"""

import hashlib
import os
import uuid
from pathlib import Path

import numpy as np
from transformers.utils import logging

from .corpus import CorpusStats, iter_documents, salient_tokens, tokenize_documents
from .inference.tokens import PAD, WORD_END, WORD_START


logger = logging.get_logger(__name__)

CHUNK_BLOCKS = 1024  # blocks per Arrow record batch (rounded down to whole groups)
CACHE_SUBFOLDER = "npm_hf_training_blocks"


def default_cache_dir() -> Path:
    """Where blocks go without `cache_dir`: a folder of the datasets cache (`HF_DATASETS_CACHE`)."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / CACHE_SUBFOLDER


def block_features(salient: bool):
    import datasets

    columns = {"input_ids": datasets.List(datasets.Value("int32")),
               "word_start": datasets.List(datasets.Value("int8")),
               "word_end": datasets.List(datasets.Value("int8")),
               "group": datasets.Value("int64")}
    if salient:
        columns["salient"] = datasets.List(datasets.Value("int8"))
    return datasets.Features(columns)


def prepare_training_blocks(corpus, tokenizer, block_size: int = 256, group_size: int = 16,
                            text_column: str = "text", salient: bool = False, cache_dir=None):
    """Cut a corpus into NPM training blocks, in groups of consecutive blocks that form one contrastive batch.

    Paragraphs are tokenized and packed into blocks of at most `block_size` tokens per document, exactly as for the
    index (`npm_hf.corpus`; the padding is left to the collator). `group_size` consecutive blocks (same or
    neighbouring documents, so that their spans co-occur) share a `group` id; a trailing incomplete group is
    dropped. `corpus` is any form `npm_hf.iter_documents` reads, streamed ones (`IterableDataset`, generators)
    included.

    Returns a memory-mapped `datasets.Dataset` (an Arrow file in `cache_dir`, default `default_cache_dir()`) with
    columns `input_ids` (int32), `word_start`, `word_end` (int8, 0/1 per token) and `group`; with `salient`, also
    `salient` (int8, 0/1 per token, see `npm_hf.corpus.salient_tokens`), which
    `NPMSpanCollator(salient_span_ratio=...)` masks first.
    """
    import datasets
    import pyarrow as pa

    if block_size < 3 or group_size < 2:
        raise ValueError(
            f"Need block_size >= 3 and group_size >= 2 (in-batch positives), got {block_size}, {group_size}."
        )
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"Cannot create the training-blocks cache folder {folder} ({error.strerror}); pass "
                         "cache_dir= a writable folder (or set HF_DATASETS_CACHE).") from None
    features = block_features(salient)
    schema = features.arrow_schema
    tmp = folder / f".blocks-{uuid.uuid4().hex}.arrow.tmp"
    stats = CorpusStats()
    digest = hashlib.sha256(repr((sorted(features.to_dict().items()), group_size)).encode())
    chunk = max(CHUNK_BLOCKS // group_size, 1) * group_size
    pending, written, seen = [], 0, 0
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            documents = iter_documents(corpus, text_column=text_column)
            for document, records in tokenize_documents(documents, tokenizer, stats, block_size=block_size):
                marks = salient_tokens(records, document["text"]) if salient else None
                for lo in range(0, len(records), block_size):
                    real = (records["flags"][lo : lo + block_size] & PAD) == 0
                    pending.append((records[lo : lo + block_size][real],
                                    marks[lo : lo + block_size][real] if salient else None))
                    seen += 1
                del records, marks
                while len(pending) >= chunk:
                    batch = _record_batch(pending[:chunk], written, group_size, salient, schema, digest)
                    writer.write_batch(batch)
                    written += chunk
                    del pending[:chunk], batch
            usable = len(pending) // group_size * group_size
            if usable:
                writer.write_batch(_record_batch(pending[:usable], written, group_size, salient, schema, digest))
                written += usable
        if written == 0:
            raise ValueError(
                f"The corpus makes {seen} blocks of at most {block_size} tokens ({stats.num_documents} documents, "
                f"{stats.num_tokens - stats.num_padding} tokens), fewer than one group of {group_size} blocks; add "
                "text or lower group_size / block_size."
            )
        path = folder / f"blocks-{digest.hexdigest()[:40]}.arrow"
        os.replace(tmp, path)  # complete: under its content's name
    finally:
        tmp.unlink(missing_ok=True)
    if written < seen:
        logger.info(f"Dropping the last {seen - written} blocks, which do not fill a whole group.")
    return datasets.Dataset.from_file(str(path))


def _record_batch(blocks: list, first_row: int, group_size: int, salient: bool, schema, digest):
    """One Arrow record batch of `blocks` (`(token records, salient marks)` each), rows from `first_row`; the
    bytes also go into `digest` (the file's name)."""
    import pyarrow as pa

    offsets = np.zeros(len(blocks) + 1, dtype=np.int32)
    np.cumsum([len(records) for records, _ in blocks], out=offsets[1:])
    records = np.concatenate([records for records, _ in blocks])
    columns = {"input_ids": records["id"].astype(np.int32),
               "word_start": ((records["flags"] & WORD_START) != 0).astype(np.int8),
               "word_end": ((records["flags"] & WORD_END) != 0).astype(np.int8)}
    if salient:
        columns["salient"] = np.concatenate([marks for _, marks in blocks]).astype(np.int8)
    groups = (np.arange(first_row, first_row + len(blocks)) // group_size).astype(np.int64)
    digest.update(offsets.tobytes())
    for values in columns.values():
        digest.update(values.tobytes())
    arrays = {name: pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)) for name, values in columns.items()}
    arrays["group"] = pa.array(groups)
    return pa.record_batch([arrays[field.name] for field in schema], schema=schema)
