"""The root folders install inside npm_hf only (style_anchors §4) and modeling/ stays self-contained."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import npm_hf


ROOT = Path(__file__).resolve().parents[1]


def test_root_folders_are_not_top_level_packages():
    result = subprocess.run([sys.executable, "-P", "-c", "import modeling"], capture_output=True, text=True,
                            cwd="/")
    assert result.returncode != 0 and "No module named 'modeling'" in result.stderr
    for name in ("modeling", "trainer", "hub_cards"):
        spec = importlib.util.find_spec(f"npm_hf.{name}")
        assert spec is not None and Path(spec.origin).parent == ROOT / name


def test_no_bare_imports_of_root_folders():
    offenders = []
    for path in [*ROOT.glob("npm_hf/**/*.py"), *ROOT.glob("modeling/*.py"), *ROOT.glob("trainer/*.py"),
                 *ROOT.glob("hub_cards/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if re.match(r"\s*(from|import) (modeling|trainer|hub_cards)\b", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert offenders == []


def test_modeling_imports_nothing_else_from_the_project():
    """modeling/ travels to the Hub as remote code: only relative imports of its own flat files."""
    for path in (ROOT / "modeling").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import)\s+(npm_hf|trainer|hub_cards)\b", text, flags=re.M), path.name
        for module in re.findall(r"^from \.(\w*)", text, flags=re.M):
            assert (ROOT / "modeling" / f"{module}.py").exists(), (path.name, module)


def test_public_api():
    assert npm_hf.__version__
    assert set(npm_hf.__all__) <= set(dir(npm_hf))
    assert npm_hf.NPMModel.__module__ == "npm_hf.modeling.modeling_npm"
