"""`NPMIndex`: an index that npm_hf can also build and edit (the remote-code `NPMIndexReader` only opens one)."""

from pathlib import Path

from ..inference.reader import NPMIndexReader
from .arguments import IndexBuildArguments
from .build import build_index_directory
from .editing import add_documents, compact, delete_documents


class NPMIndex(NPMIndexReader):
    """Token-level index over a reference corpus. Build with [`NPMIndex.build`], open with [`NPMIndex.load`],
    [`NPMIndex.from_pretrained`] or [`NPMIndex.for_model`]; search and evidence as [`NPMIndexReader`]."""

    @classmethod
    def build(cls, model, tokenizer, corpus, output_dir, args: IndexBuildArguments | None = None) -> "NPMIndex":
        """Encode `corpus` with `model` and write an index to `output_dir` (atomically). Returns the loaded index.

        Under `torchrun` / `accelerate launch` every process encodes its share; `args.resume` continues an
        interrupted build. See `npm_hf.index.build`."""
        args = args or IndexBuildArguments()
        limit = getattr(model.config, "max_input_length", None)
        if limit is not None and args.block_size > limit:
            raise ValueError(
                f"block_size={args.block_size} is longer than the encoder accepts ({limit} tokens); "
                f"use block_size <= {limit} (CLI: --block-size {limit})."
            )
        build_index_directory(model, tokenizer, corpus, Path(output_dir), args)
        return cls.load(output_dir, verify="none")  # just written and hashed

    def add_documents(self, model, tokenizer, documents, batch_size: int = 16,
                      show_progress_bar: bool = False) -> "NPMIndex":
        """Encode `documents` (any corpus form `build` takes) with `model` into new blocks after the existing ones
        and add them to this index, on disk and in this object, as an append segment: nothing else is encoded or
        rewritten. The model and tokenizer must be the ones the index was built with; ids must be new. Atomic: see
        `npm_hf.index.editing`."""
        add_documents(self, model, tokenizer, documents, batch_size=batch_size, show_progress_bar=show_progress_bar)
        return self._reload()

    def delete_documents(self, doc_ids) -> "NPMIndex":
        """Remove the documents with these ids, on disk and in this object: a tombstone file lists them, their
        tokens leave every search, span and evidence. Their vectors and text stay on disk until `compact`. An
        unknown id raises NPMIndexError and changes nothing."""
        delete_documents(self, doc_ids)
        return self._reload()

    def compact(self) -> "NPMIndex":
        """Rewrite this index without its edits: its append segments merged into one set of files, the vectors and
        text of deleted documents gone, BM25 indexed again (what a build of the live documents holds, but for their
        block positions). Costs about as much as writing the index again."""
        compact(self)
        return self._reload(keep_flat_index=False)

    def _reload(self, keep_flat_index: bool = True) -> "NPMIndex":
        # just written and hashed; an unchanged base keeps its filled flat FAISS index (never changed in place)
        loaded = type(self).load(self.path, verify="none", previous=self if keep_flat_index else None)
        self.__dict__.update(loaded.__dict__)
        return self
