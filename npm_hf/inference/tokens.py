"""The per-token records of a corpus (written by `npm_hf.corpus`, read by the index and by decoding)."""

import numpy as np


WORD_START, WORD_END, SPECIAL = 1, 2, 4
LINE_START = 8  # first visible token after a line break (indexes that have it say so: manifest.line_starts_marked)
PAD = 16  # filler after a block's last paragraph, always with SPECIAL (indexes that have it: manifest.paragraph_blocks)
# One record per corpus token; memory-mappable, no Python objects (loads without pickle).
TOKEN_DTYPE = np.dtype([("id", "<i4"), ("doc", "<i4"), ("start", "<i4"), ("end", "<i4"), ("flags", "u1")])
