"""Everything a saved NPM needs to load its index and answer `pipeline("fill-mask")`: the remote-code closure.

`npm_hf.remote_code.add_remote_pipeline` copies `pipeline.py` into every saved NPM directory together with the
modules it imports, found by transformers' `dynamic_module_utils.get_relative_import_files`, so that a process
without npm_hf answers with `pipeline("fill-mask", model=..., trust_remote_code=True)`. That closure is exactly the
modules of this folder (a test checks it):

    pipeline        NonparametricFillMaskPipeline: preprocessing, the encoder forward, batching, answers
    decoding        NPMDecodingConfig: k, temperature, span rules, pre-filter and search settings (decoding_config.json)
    retrieval       NPMPredictor: token and span scoring over a candidate source (the whole index, given positions)
    prefilter       BM25 and dense passage pre-filters
    reader          NPMIndexReader: opening, verifying and searching an index directory, evidence
    validation      load-time checks against crafted indexes: FAISS header sizes, manifest file names, array ranges
    faiss_io        reading FAISS indexes (memory-mapped, on-disk IVF), search knobs, streamed exact search
    vector_shards   the float16 vectors in row shards, and their layout
    index_files     file names, the manifest (checked and sealed), encoder and tokenizer fingerprints, documents
    directory_swap  the writer lock of an index directory, swaps into place, repair of a swap cut by a kill
    stopwords       stop-word and word-piece tables of a tokenizer
    tokens          the flag bits and dtype of corpus token records

Why flat, and why nothing else may be imported: transformers resolves only `from .name import ...` to `name.py`
in the same folder (no subpackages, no `..`), and copies nothing else. So these modules import each other with
`from .name import`, never from the rest of npm_hf (building, editing, training, evaluation stay out of every
saved model), and this `__init__` imports nothing.
"""
