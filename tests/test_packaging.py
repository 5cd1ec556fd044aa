"""The root folders install inside npm_hf only (style_anchors §4) and modeling/ stays self-contained."""

import ast
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


LIBRARY = [*ROOT.glob("npm_hf/**/*.py"), *ROOT.glob("modeling/*.py"), *ROOT.glob("trainer/*.py"),
           *ROOT.glob("hub_cards/*.py")]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] != "npm_hf":
        parts.insert(0, "npm_hf")  # the root folders install as npm_hf.modeling, npm_hf.trainer, npm_hf.hub_cards
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path) for path in LIBRARY}


def _project_imports(path: Path) -> list[tuple[int, str, list[str], bool]]:
    """(line, imported module, imported names, inside a function) of every relative import in a library file."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ImportFrom) and child.level > 0:
                base = package[: len(package) - child.level + 1]
                module = ".".join([*base, child.module] if child.module else base)
                names = [alias.name for alias in child.names]
                submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]  # `from . import x`
                for target in submodules or [module]:
                    found.append((child.lineno, target, names, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text()), False)
    return found


def test_remote_code_is_exactly_the_inference_folder():
    """What every saved NPM carries is npm_hf/inference, flat (see its docstring): transformers' own closure of
    pipeline.py is that folder, and its files import nothing else from the project."""
    from npm_hf.remote_code import remote_code_files

    folder = ROOT / "npm_hf" / "inference"
    assert remote_code_files() == sorted(p.name for p in folder.glob("*.py") if p.name != "__init__.py")
    for path in folder.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from \.\.|from npm_hf|import npm_hf)", text, flags=re.M), path.name
        if path.name == "__init__.py":
            assert not re.search(r"^\s*(from|import) ", text, flags=re.M)  # not copied: it may import nothing


def test_library_imports_only_go_down():
    """No import circle between library modules, no import inside a function to break one, and no private name
    imported from another file."""
    graph, offenders = {}, []
    for path in LIBRARY:
        name = _module_name(path)
        for number, module, names, in_function in _project_imports(path):
            graph.setdefault(name, set()).add(module)
            where = f"{path.relative_to(ROOT)}:{number}"
            if in_function:
                offenders.append(f"{where}: import of {module} inside a function")
            offenders += [f"{where}: private name {n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert offenders == []

    def reaches(start, target, seen):
        for module in graph.get(start, ()):
            if module == target or (module not in seen and not seen.add(module) and reaches(module, target, seen)):
                return True
        return False

    assert [name for name in graph if reaches(name, name, set())] == []  # modules in an import circle


def test_no_library_module_holds_several_subjects():
    long = {str(p.relative_to(ROOT)): n for p in LIBRARY if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}
