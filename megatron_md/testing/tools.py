"""Load the repository's ``tools/*.py`` scripts and test modules by path (tests call their functions)."""
from __future__ import annotations

from importlib import util
from pathlib import Path

__all__ = ["load_tool", "load_module"]

_TOOLS = Path(__file__).resolve().parents[2] / "tools"


def load_module(path) -> object:
    """The Python file ``path`` as a module named after it (scripts and test siblings)."""
    path = Path(path)
    spec = util.spec_from_file_location(path.stem, path)
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_tool(name: str):
    """``tools/<name>.py`` as a module (the scripts are not a package)."""
    return load_module(_TOOLS / f"{name}.py")
