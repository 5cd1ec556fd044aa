"""Crafted index directories are refused at load, before anything large is read: FAISS files that claim more than
they hold, manifests naming files outside the index, arrays out of range. Paths of the build machine stay out of the
files, so two identical builds give identical bytes."""

import json
import os
import shutil
import struct
import time

import faiss
import numpy as np
import pytest

from npm_hf import IndexBuildArguments, NPMIndex, NPMIndexError, build_index
from npm_hf.inference.index_files import CHECKSUM_KEY, manifest_checksum
from npm_hf.inference.validation import check_index_arrays


def _manifest(index_dir):
    return json.loads((index_dir / "manifest.json").read_text())


def _write_manifest(index_dir, manifest: dict) -> None:
    """A rewritten manifest that vouches for its changes: sealed with a matching checksum (see test_bad_inputs for
    what an unsealed edit gets), to reach the checks behind it."""
    manifest = {key: value for key, value in manifest.items() if key != CHECKSUM_KEY}
    (index_dir / "manifest.json").write_text(json.dumps({**manifest, CHECKSUM_KEY: manifest_checksum(manifest)}))


def _write_keeping_size(path, data: bytes):
    """Replace a file by bytes of the same length: its size still matches the manifest (loaded with verify='none',
    as a crafted index whose checksums were recomputed would be)."""
    assert len(data) == path.stat().st_size
    path.write_bytes(data)


# ------------------------------------------------------------------------------------------------ FAISS files
def test_a_flat_index_faiss_claiming_2gb_of_codes_is_refused_before_faiss_reads_it(index_copy):
    data = bytearray((index_copy / "index.faiss").read_bytes())
    assert len(data) == 45 and data[:4] == b"IxFI"  # an empty flat index: the header and a code count of 0
    data[37:45] = struct.pack("<Q", 1 << 29)  # 2^29 floats = 2^31 bytes of codes, in a 45-byte file
    _write_keeping_size(index_copy / "index.faiss", bytes(data))
    with pytest.raises(NPMIndexError, match=r"index.faiss is a flat FAISS index that claims 0 vectors in 45 bytes; "
                                            r"npm_hf stores flat indexes empty"):
        NPMIndex.load(index_copy, verify="none")


def test_a_filled_flat_index_faiss_is_refused(index_copy):
    manifest = _manifest(index_copy)
    filled = faiss.IndexFlatIP(manifest["hidden_size"])
    filled.add(np.ones((3, manifest["hidden_size"]), dtype=np.float32))
    faiss.write_index(filled, str(index_copy / "index.faiss"))
    with pytest.raises(NPMIndexError, match=r"index.faiss is \d+ bytes, the manifest says 45"):
        NPMIndex.load(index_copy, verify="none")  # sizes are checked first
    # the same with a size that matches (a manifest rewritten to vouch for it): refused all the same
    manifest["files"]["index.faiss"]["bytes"] = (index_copy / "index.faiss").stat().st_size
    _write_manifest(index_copy, manifest)
    with pytest.raises(NPMIndexError, match=r"claims 3 vectors in \d+ bytes"):
        NPMIndex.load(index_copy, verify="none")


def test_a_faiss_file_of_another_dimension_is_refused(index_copy):
    data = bytearray((index_copy / "index.faiss").read_bytes())
    data[4:8] = struct.pack("<i", 1 << 30)
    _write_keeping_size(index_copy / "index.faiss", bytes(data))
    with pytest.raises(NPMIndexError, match=r"declares vectors of dimension 1073741824, the manifest \d+"):
        NPMIndex.load(index_copy, verify="none")


@pytest.fixture(scope="module")
def ivf_model(tmp_path_factory, npm_dir, corpus):
    folder = tmp_path_factory.mktemp("ivf") / "model"
    shutil.copytree(npm_dir, folder, ignore=shutil.ignore_patterns("index"))
    build_index(folder, corpus, args=IndexBuildArguments(block_size=16, faiss_factory="IVF2,Flat",
                                                         show_progress_bar=False))
    return folder


@pytest.mark.parametrize("field, value, message", [
    ("nlist", 1 << 40, r"claims 1099511627776 inverted lists in \d+ bytes"),
    ("centroids", 1 << 29, r"coarse quantizer claims 2 centroids \(536870912 floats\) for 2 lists"),
])
def test_an_ivf_index_faiss_with_crafted_sizes_is_refused(tmp_path, ivf_model, field, value, message):
    index_dir = tmp_path / "index"
    shutil.copytree(ivf_model / "index", index_dir)
    NPMIndex.load(index_dir, verify="full")  # as built: loads
    data = bytearray((index_dir / "index.faiss").read_bytes())
    assert data[:4] == b"IwFl" and data[53:57] == b"IxFI"  # IVF header (37 bytes, nlist, nprobe), flat quantizer
    if field == "nlist":
        data[37:45] = struct.pack("<q", value)
    else:
        data[53 + 37 : 53 + 45] = struct.pack("<Q", value)
    _write_keeping_size(index_dir / "index.faiss", bytes(data))
    with pytest.raises(NPMIndexError, match=message):
        NPMIndex.load(index_dir, verify="none")


# ------------------------------------------------------------------------------------------- manifest names
@pytest.mark.parametrize("name", ["../../secret.txt", "ABSOLUTE", "sub/../token_ids.npy", "..", "C:secret"])
def test_manifest_files_must_be_plain_names_inside_the_index(tmp_path, index_copy, name):
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the index")
    name = str(secret) if name == "ABSOLUTE" else name
    manifest = _manifest(index_copy)
    manifest["files"][name] = {"bytes": 1, "sha256": "0" * 64}  # a wrong size: a disclosure would name the real one
    _write_manifest(index_copy, manifest)
    for verify in ("none", "fast", "full"):
        with pytest.raises(NPMIndexError, match=r"lists files \[.*\] that are not plain file names inside the "
                                                r"index") as error:
            NPMIndex.load(index_copy, verify=verify)
        assert "bytes" not in str(error.value)


# ------------------------------------------------------------------------------------------- array ranges
def _craft(index_dir, name, change):
    array = np.load(index_dir / name)
    crafted = change(array.copy())
    np.save(index_dir / name, crafted.astype(array.dtype, copy=False))
    assert (index_dir / name).stat().st_size == _manifest(index_dir)["files"][name]["bytes"]


@pytest.mark.parametrize("name, change, message", [
    ("positions.npy", lambda a: np.where(np.arange(len(a)) == len(a) - 1, 10**9, a), r"positions\[\d+\] = 1000000000 "
     r"is not in \[0, \d+\]"),
    ("positions.npy", lambda a: np.where(np.arange(len(a)) == 0, -5, a), r"positions\[0\] = -5 is not in"),
    ("positions.npy", lambda a: a[::-1], r"positions is not increasing at row 1"),
    ("token_docs.npy", lambda a: np.where(np.arange(len(a)) == 7, 6, a), r"token_docs\[7\] = 6 is not in \[0, 4\]"),
    ("token_ids.npy", lambda a: np.where(np.arange(len(a)) == 3, -1, a), r"token_ids\[3\] = -1 is not >= 0"),
    ("token_offsets.npy", lambda a: np.where(np.arange(len(a))[:, None] == 2, [[9, 4]], a),
     r"token_offsets\[2\] = \[9, 4\] is not 0 <= start <= end"),
    ("document_offsets.npy", lambda a: a + 1, r"document_offsets must run from 0 to the size of documents.jsonl"),
    ("document_offsets.npy", lambda a: np.where(np.arange(len(a)) == 2, a[1], a),
     r"document_offsets is not increasing at row 2"),
])
def test_crafted_arrays_are_refused_at_load(plain_index_copy, name, change, message):
    """Format 1/2 indexes (plain token files) are range-checked at load (format 3's: tests/index/test_compact.py)."""
    assert _manifest(plain_index_copy)["num_documents"] == 5
    _craft(plain_index_copy, name, change)
    with pytest.raises(NPMIndexError, match=message):
        NPMIndex.load(plain_index_copy, verify="none")


def test_float_positions_are_refused(plain_index_copy):
    positions = np.load(plain_index_copy / "positions.npy")
    np.save(plain_index_copy / "positions.npy", positions.astype(np.float64 if positions.itemsize == 8 else np.float32))
    with pytest.raises(NPMIndexError, match=r"positions holds float\d+ values, not integers"):
        NPMIndex.load(plain_index_copy, verify="none")


def test_range_checks_are_cheap_on_a_million_tokens(npm_dir):
    """check_index_arrays on 10^6 tokens (all indexed) and 10^4 documents: well under a second (measured about
    10 ms on the 2-core AMD EPYC sandbox); chunked, so its temporaries stay small."""
    index = NPMIndex.load(npm_dir / "index")
    n, docs = 10**6, 10**4
    manifest = type(index.manifest)(**{**index.manifest.__dict__, "num_tokens": n, "num_documents": docs})
    tokens = {"token_ids": np.ones(n, np.int32), "token_docs": np.repeat(np.arange(docs, dtype=np.int32), n // docs),
              "token_offsets": np.tile(np.array([[0, 3]], np.int32), (n, 1)), "token_flags": np.zeros(n, np.uint8)}
    offsets = np.arange(docs + 1, dtype=np.int64) * 10
    started = time.perf_counter()
    check_index_arrays(index.path, manifest, tokens, np.arange(n, dtype=np.int64), offsets, docs * 10)
    assert time.perf_counter() - started < 1.0


# ---------------------------------------------------------------------------------- no build paths in the files
def test_two_identical_ivf_builds_give_identical_files_without_local_paths(tmp_path, ivf_model, corpus):
    other = tmp_path / "elsewhere" / "model"
    shutil.copytree(ivf_model, other, ignore=shutil.ignore_patterns("index"))
    build_index(other, corpus, args=IndexBuildArguments(block_size=16, faiss_factory="IVF2,Flat",
                                                        show_progress_bar=False))
    first, second = ivf_model / "index", other / "index"
    assert sorted(os.listdir(first)) == sorted(os.listdir(second))
    for name in os.listdir(first):
        if name != "manifest.json":
            assert (first / name).read_bytes() == (second / name).read_bytes(), name
    one, two = _manifest(first), _manifest(second)
    assert one["files"] == two["files"] and one["encoder_name_or_path"] == two["encoder_name_or_path"] == ".."
    for folder in (first, second):
        for path in folder.iterdir():
            assert str(folder.parent.parent).encode() not in path.read_bytes(), path
    np.testing.assert_array_equal(NPMIndex.load(second).search(np.ones((2, one["hidden_size"]), np.float32), 3)[1],
                                  NPMIndex.load(first).search(np.ones((2, one["hidden_size"]), np.float32), 3)[1])
