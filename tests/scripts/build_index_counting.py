"""`npm-hf build-index` that reports how many work units this process encoded, and can fail like a killed process.

Usage (alone or under torchrun, by test_index_build.py): build_index_counting.py FAIL_RANK FAIL_AFTER CLI_ARGS...
Process FAIL_RANK raises after encoding FAIL_AFTER units (-1: no process fails).
"""

import os
import sys

import npm_hf.index.build as index_build
from npm_hf.cli import main


def run(fail_rank: int, fail_after: int, argv: list[str]) -> int:
    rank = int(os.environ.get("RANK", "0"))
    encode_unit = index_build.encode_unit
    encoded = []

    def counting(path, *args):
        if rank == fail_rank and len(encoded) == fail_after:
            raise RuntimeError(f"injected failure of process {rank}")
        encoded.append(path.name)
        return encode_unit(path, *args)

    index_build.encode_unit = counting
    try:
        return main(argv)
    finally:
        print(f"process {rank} encoded {len(encoded)} units", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]))
