"""`npm-hf` commands end to end on real files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from npm_hf.cli import main


def test_convert_build_and_fill(tmp_path, encoder_dir, capsys, mask):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in [
        {"id": "tx", "title": "Texas", "text": "Texas borders New Mexico."},
        {"id": "ky", "title": "Kentucky", "text": "Lincoln was born in Kentucky."},
        {"text": " "},
    ]), encoding="utf-8")
    model = tmp_path / "npm"
    assert main(["convert", "--encoder", str(encoder_dir), "--output", str(model)]) == 0
    assert main(["build-index", "--model", str(model), "--corpus", str(corpus), "--block-size", "32",
                 "--batch-size", "2", "--no-show-progress-bar"]) == 0
    out = capsys.readouterr().out
    assert "of 2 documents (1 empty skipped)" in out and str(model / "index") in out
    assert main(["fill-mask", "--model", str(model), "--top-k", "2", "--json", f"Lincoln was born in {mask}."]) == 0
    answers = json.loads(capsys.readouterr().out)
    assert len(answers) == 2 and answers[0]["evidence"]["doc_id"] in {"tx", "ky"}
    assert main(["fill-mask", "--model", str(model), "--top-k", "1", f"Texas borders {mask}."]) == 0
    text = capsys.readouterr().out
    assert text.startswith("1. ") and "score=" in text and "from " in text
    assert main(["fill-mask", "--model", str(model), "--top-k", "5", "--prefilter", "bm25", "--prefilter-blocks", "1",
                 "--json", f"Lincoln was born in {mask}."]) == 0
    answers = json.loads(capsys.readouterr().out)  # each document is a block of its own: BM25 keeps one
    assert answers and len({answer["evidence"]["doc_id"] for answer in answers}) == 1
    assert main(["fill-mask", "--model", str(model), "--top-k", "5", "--prefilter", "bm25", "--prefilter-blocks", "2",
                 "--prefilter-passage-tokens", "8", "--prefilter-weight", "2", "--json",
                 f"Lincoln was born in {mask}."]) == 0
    windows = json.loads(capsys.readouterr().out)
    assert windows and windows != answers  # two 8-token windows hold fewer candidates than the whole block
    assert main(["build-index", "--model", str(model), "--corpus", str(corpus), "--block-size", "32",
                 "--output", str(tmp_path / "open"), "--remove-stopwords", "--no-show-progress-bar"]) == 0
    capsys.readouterr()
    open_set = json.loads((tmp_path / "open" / "manifest.json").read_text())
    closed_set = json.loads((model / "index" / "manifest.json").read_text())
    assert open_set["stopwords_removed"] and not closed_set["stopwords_removed"]
    assert open_set["num_indexed_tokens"] < closed_set["num_indexed_tokens"]
    with pytest.raises(SystemExit):
        main(["fill-mask", "--model", str(model), "--prefilter", "bm26", f"Texas borders {mask}."])
    with pytest.raises(SystemExit):
        main(["fill-mask", "--model", str(model), "--prefilter-passage-tokens", "wide", f"Texas borders {mask}."])


def test_errors_are_reported_not_raised(tmp_path, encoder_dir, capsys):
    assert main(["build-index", "--model", str(encoder_dir), "--corpus", "x.txt"]) == 2
    assert "not an NPM" in capsys.readouterr().err
    model = tmp_path / "npm"
    assert main(["convert", "--encoder", str(encoder_dir), "--output", str(model)]) == 0
    assert main(["convert", "--encoder", str(encoder_dir), "--output", str(model)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\xfe\n")
    assert main(["build-index", "--model", str(model), "--corpus", str(bad), "--block-size", "32"]) == 2
    assert "line 2: not valid UTF-8" in capsys.readouterr().err
    assert not (model / "index").exists()
    with pytest.raises(SystemExit):
        main(["build-index", "--model", str(model)])  # argparse: --corpus is required


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "npm-hf"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=os.environ)
    assert result.returncode == 0
    for command in ("convert", "build-index", "fill-mask", "demo"):
        assert command in result.stdout
