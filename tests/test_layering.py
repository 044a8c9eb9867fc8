"""The house layering: repo/ imports neither engine/ nor cli/ nor torch; engine/ never imports cli/,
and reaches the store only through cryopool.repo's public API."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

from cryopool.cli.main import COMMANDS

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


# the one deliberate exception: a partial clone's fallback imports the network layer (httpx, fsspec) on first
# use, so that opening a repository, and with it status/log/show, never pays for it
LAZY_IMPORTS = {("repo/repository.py", "transport"), ("repo/__init__.py", "remote")}


def test_no_function_local_imports_in_library_code():
    for folder in ("repo", "engine"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for fn in ast.walk(tree):
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for node in ast.walk(fn):
                        if isinstance(node, ast.ImportFrom) and \
                                (path.relative_to(ROOT).as_posix(), node.module) in LAZY_IMPORTS:
                            continue
                        assert not isinstance(node, (ast.Import, ast.ImportFrom)), \
                            f"{path}:{node.lineno}: import inside {fn.name}()"


def test_the_cli_starts_without_heavy_modules():
    """`cryopool status/log/show/diff/branch` import none of torch, pandas, scipy, matplotlib, fastapi, httpx."""
    code = ("import sys, cryopool.cli.main as m\n"
            "for name in ('status', 'log', 'show', 'diff', 'branch', 'checkout', 'tag'):\n"
            "    m.cli.get_command(None, name)\n"
            "print(' '.join(sorted(k for k in sys.modules if k.split('.')[0] in HEAVY)))")
    heavy = "{'torch', 'pandas', 'scipy', 'matplotlib', 'fastapi', 'uvicorn', 'httpx', 'fsspec', 'starfile', 'gemmi'}"
    out = subprocess.run([sys.executable, "-c", f"HEAVY = {heavy}\n{code}"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout


def test_the_command_list_says_what_each_command_says():
    """`cryopool --help` lists commands from a table (without importing them): it must match the commands."""
    for name, (module, attribute, text) in COMMANDS.items():
        command = getattr(importlib.import_module(f"cryopool.cli.{module}"), attribute)
        assert command.name == name and command.get_short_help_str(limit=200) == text, name
