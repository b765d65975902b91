"""Package attributes imported on first use (PEP 562), so importing a package costs nothing until a name is used.

A package lists each public name once, as an import inside ``if TYPE_CHECKING:`` (which type checkers and
IDEs read); :func:`lazy_exports` reads that block from the package's source to learn where each name lives,
so there is no second table to keep in step with it.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any


def type_checking_imports(source_file: str) -> dict[str, str]:
    """``{name: module}`` for every ``from module import name`` under ``if TYPE_CHECKING:`` in a file."""
    tree = ast.parse(Path(source_file).read_text(encoding="utf-8"))
    exports: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for statement in node.body:
                if isinstance(statement, ast.ImportFrom) and statement.module:
                    for alias in statement.names:
                        exports[alias.asname or alias.name] = statement.module
    return exports


def lazy_exports(namespace: dict[str, Any]) -> tuple[list[str], Callable, Callable]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for the package whose globals are ``namespace``."""
    package = namespace["__name__"]
    exports = type_checking_imports(namespace["__file__"])

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return sorted(exports), __getattr__, __dir__
