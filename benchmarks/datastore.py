"""What the official datastore rules save: index bytes per corpus token and build time, side by side in one run.

    python benchmarks/datastore.py [--variants all-tokens,boundaries,no-stopwords] [--max-tokens N]

Builds a Flat index of the MiniLM NPM over the Wikipedia sample (../shared/offline_data/enwiki_sample, 647k tokens)
once per variant, in the order given, and prints one JSON object per variant on stdout:

    all-tokens    IndexBuildArguments(index_all_tokens=True): every non-special token gets a vector (npm_hf 0.1)
    boundaries    the default: word starts and word ends only (the official `embs_consider_boundary`)
    no-stopwords  remove_stopwords=True as well: the paper's open-set datastore
    default       IndexBuildArguments() of whichever npm_hf is imported (to measure an older checkout)

"Corpus tokens" are the tokens of the documents' text (special and PAD tokens excluded), the same count for every
variant, so bytes per corpus token compare directly. Build time is the whole NPMIndex.build.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import CORPUS, directory_bytes, make_model, quiet_libraries  # noqa: E402


VARIANTS = {"all-tokens": {"index_all_tokens": True}, "boundaries": {},
            "no-stopwords": {"remove_stopwords": True}, "default": {}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="all-tokens,boundaries,no-stopwords")
    parser.add_argument("--max-tokens", type=int, default=None, help="Stop adding documents past this many tokens.")
    args = parser.parse_args(argv)
    quiet_libraries()
    from npm_hf import IndexBuildArguments, NPMIndex

    with open(CORPUS, encoding="utf-8") as handle:
        documents = [{key: record[key] for key in ("id", "title", "text")} for record in map(json.loads, handle)]
    with tempfile.TemporaryDirectory(prefix="npm_hf-datastore-") as tmp:
        model, tokenizer = make_model(Path(tmp))
        if args.max_tokens:
            chosen, total = [], 0
            for document in documents:
                total += len(tokenizer(document["text"], add_special_tokens=False)["input_ids"])
                if total > args.max_tokens:
                    break
                chosen.append(document)
            documents = chosen
        for name in args.variants.split(","):
            out = Path(tmp) / name
            build_args = IndexBuildArguments(block_size=256, batch_size=16, show_progress_bar=False,
                                             **VARIANTS[name])
            started = time.perf_counter()
            index = NPMIndex.build(model, tokenizer, documents, out, build_args)
            seconds = time.perf_counter() - started
            flags = np.asarray(index.token_flags)
            text_tokens = int(((flags & 4) == 0).sum())  # SPECIAL (PAD tokens are special too)
            files = directory_bytes(out)
            total = sum(files.values())
            print(json.dumps({
                "variant": name, "documents": len(documents), "corpus_tokens": text_tokens,
                "stored_tokens": index.manifest.num_tokens, "indexed_tokens": index.manifest.num_indexed_tokens,
                "bytes": total, "bytes_per_corpus_token": round(total / text_tokens, 2),
                "bytes_per_indexed_token": round(total / index.manifest.num_indexed_tokens, 2),
                "build_seconds": round(seconds, 1),
                "files_bytes_per_corpus_token": {k: round(v / text_tokens, 2) for k, v in files.items()},
            }), flush=True)
            del index


if __name__ == "__main__":
    main()
