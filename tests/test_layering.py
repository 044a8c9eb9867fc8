"""The house layering: repo/ imports neither engine/ nor cli/ nor torch; engine/ never imports cli/,
and reaches the store only through cryopool.repo's public API."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(folder: str):
    for path in sorted((ROOT / folder).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, alias.name, 0
            elif isinstance(node, ast.ImportFrom):
                yield path, node.module or "", node.level


def test_repo_is_the_bottom_layer():
    for path, module, level in _imports("repo"):
        assert not module.startswith(("cryopool.engine", "cryopool.cli", "torch")), f"{path}: imports {module}"
        if level >= 2:  # from ..x import y inside repo/formats
            assert path.parent.name == "formats" and level == 2, f"{path}: relative import escapes repo/"


def test_engine_does_not_import_cli_or_repo_internals():
    for path, module, _ in _imports("engine"):
        assert not module.startswith("cryopool.cli"), f"{path}: imports {module}"
        if module.startswith("cryopool.repo."):
            raise AssertionError(f"{path}: engine must use cryopool.repo's public API, not {module}")


def test_no_function_local_imports_in_library_code():
    for folder in ("repo", "engine"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for fn in ast.walk(tree):
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for node in ast.walk(fn):
                        assert not isinstance(node, (ast.Import, ast.ImportFrom)), \
                            f"{path}:{node.lineno}: import inside {fn.name}()"
