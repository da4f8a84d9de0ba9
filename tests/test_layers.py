"""The layout holds: imports point down the layers (import-linter, .importlinter), no module reaches another
module's private names, and no module or class outgrows what a reader can hold."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HELPERS = ROOT / "helpers"
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 250


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """lint-imports with the project's contracts, on the package under `root`."""
    script = ("import sys; from importlinter.cli import lint_imports; "
              "sys.exit(lint_imports(config_filename='.importlinter', no_cache=True))")
    return subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_imports_point_down_the_layers():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout and "Contracts: 2 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("module, upward", [
    ("helpers/model/inference.py", "from helpers.compute import metrics"),     # model -> compute
    ("helpers/compute/metrics.py", "from helpers.steps import context"),     # compute -> steps
    ("helpers/plots/figures.py", "from helpers.files import background"),    # plots -> the figure worker
    ("helpers/files/atomic.py", "import helpers.pipeline"),                  # files -> a face
    ("helpers/files/cache.py", "from helpers.model import inference"),       # files -> model (files sits under it)
    ("helpers/data/datasets.py", "from helpers.model import layers"),        # data -> model (independent siblings)
])
def test_an_upward_import_breaks_the_contract(tmp_path, module, upward):
    """The contract is not vacuous: one added upward import, in a copy of the package, fails it."""
    shutil.copytree(HELPERS, tmp_path / "helpers", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{upward}  # added by the test\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout + result.stderr


def _modules() -> list[Path]:
    return sorted(HELPERS.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_imports_another_modules_private_names():
    offences = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("helpers"):
                offences += [f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{a.name}"
                             for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offences, "private names imported across modules:\n" + "\n".join(offences)


def test_no_module_reaches_another_objects_private_attributes():
    """`obj._x` is allowed only on self/cls (and on the module's own names); `an._path` from a step is not."""
    offences = []
    for path in _modules():
        tree = ast.parse(path.read_text(), str(path))
        external = set()   # names bound to other libraries (torch._foreach_norm is torch's business)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                external |= {(a.asname or a.name).split(".")[0] for a in node.names if not a.name.startswith("helpers")}
            elif isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("helpers") and node.level == 0:
                external |= {a.asname or a.name for a in node.names}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue   # an object's own state (self.outputs._x, a chain, is not)
            root = node.value
            while isinstance(root, (ast.Attribute, ast.Call, ast.Subscript)):
                root = root.func if isinstance(root, ast.Call) else root.value
            if isinstance(root, ast.Name) and root.id in external:
                continue
            offences.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert not offences, "private attributes reached from outside:\n" + "\n".join(offences)


def test_modules_and_classes_stay_small():
    too_long = []
    for path in _modules():
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                too_long.append(f"{path.relative_to(ROOT)}: class {node.name} {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, "\n".join(too_long)
