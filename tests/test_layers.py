"""The architecture's layers, read from the source's imports: core/ is the foundation (it imports no other layer
of epd but schemas/), the gateway never reaches into workers/, and connectors/ hold no worker or gateway code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the epd packages its modules may import (besides their own and the standard ones below)
ALLOWED = {
    "core": {"core", "schemas"},
    "schemas": {"core", "schemas"},
    "connectors": {"core", "schemas", "connectors"},
    "gateway": {"core", "schemas", "connectors", "gateway"},
}


def _epd_imports(path: Path) -> set[str]:
    """The top-level epd packages a module imports (`from epd.core.x import y` -> core), lazy imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found |= {n.split(".")[1] for n in names if n.startswith("epd.") and n.count(".") >= 1}
    return found


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_beneath_it(folder: str) -> None:
    modules = sorted((ROOT / folder).glob("*.py"))
    assert modules, folder
    wrong = {m.name: sorted(_epd_imports(m) - ALLOWED[folder]) for m in modules}
    assert {k: v for k, v in wrong.items() if v} == {}


def test_the_import_reader_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The check above could pass by reading nothing: it finds the imports it forbids, lazy ones too."""
    m = tmp_path / "m.py"
    m.write_text("import os\nfrom epd.core import subjects\n\ndef f():\n    from epd.workers.runtime import Runtime\n")
    assert _epd_imports(m) == {"core", "workers"}


def _writes_environ(path: Path) -> bool:
    """Whether a module assigns to `os.environ[...]`, or calls `os.environ.update` / `setdefault` / `os.putenv`."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Subscript) and ast.unparse(t.value) == "os.environ" for t in targets):
            return True
        if isinstance(node, ast.Call) and ast.unparse(node.func) in (
            "os.environ.update",
            "os.environ.setdefault",
            "os.putenv",
        ):
            return True
    return False


def test_connectors_leave_the_environment_to_the_process_entry(tmp_path: Path) -> None:
    """A process's environment is its entry's to set (core.config.export_mooncake_env), not a library's."""
    assert [m.name for m in sorted((ROOT / "connectors").glob("*.py")) if _writes_environ(m)] == []
    m = tmp_path / "m.py"
    m.write_text("import os\n\ndef f():\n    os.environ['X'] = '1'\n")
    assert _writes_environ(m)
