"""What every command shares: the context, JSON output, error mapping, rendering helpers."""

from __future__ import annotations

import errno
import functools
import json
import sys
import traceback

import click

from cryopool.repo import CryopoolError, Repository

__all__ = ["Context", "emit_json", "handle_errors", "json_option", "human_bytes", "short", "progress_bar", "table"]

JSON_FORMAT_VERSION = 1


class Context:
    def __init__(self, repo_path: str, debug: bool) -> None:
        self.repo_path = repo_path
        self.debug = debug

    def repo(self) -> Repository:
        return Repository.open(self.repo_path)


def emit_json(payload: dict) -> None:
    click.echo(json.dumps({"format_version": JSON_FORMAT_VERSION, **payload}, indent=2, sort_keys=True, default=str))


def _as_error(exc: BaseException) -> CryopoolError | None:
    """A library error as it is; a full disk, a failed read or write, or a network failure as one."""
    if isinstance(exc, CryopoolError):
        return exc
    if isinstance(exc, OSError) and type(exc).__module__ == "builtins":
        if exc.errno == errno.ENOSPC:
            return CryopoolError("no space left on the device", path=exc.filename,
                                 hint="free some space and run the command again: nothing was committed, and "
                                      "'cryopool gc' clears what the attempt left in .cryopool/tmp")
        what = exc.strerror or type(exc).__name__
        return CryopoolError(f"{what} (nothing was committed)", path=exc.filename)
    if type(exc).__module__.split(".")[0] in ("httpx", "httpcore"):  # checked by name: httpx is imported lazily
        return CryopoolError(f"network error: {exc or type(exc).__name__}",
                             hint="check the remote's URL and that it is reachable; transfers resume where they "
                                  "stopped")
    return None


def handle_errors(fn):
    """Map errors to one line (and a hint), or a JSON error object under --json; exit code 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as raw:  # noqa: BLE001 — anything not ours is re-raised below
            exc = _as_error(raw)
            if exc is None:
                raise
            obj = click.get_current_context().find_object(Context)
            if obj is not None and obj.debug:
                traceback.print_exc()
            if kwargs.get("as_json"):
                emit_json({"error": {"type": type(exc).__name__, "message": exc.message, "path": exc.path,
                                     "field": exc.field, "expected": exc.expected, "found": exc.found,
                                     "hint": exc.hint, "text": str(exc)}})
                sys.exit(1)
            click.secho(f"error: {exc}", fg="red", err=True)
            if exc.hint:
                click.echo(f"hint: {exc.hint}", err=True)
            sys.exit(1)
    return wrapper


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output (versioned JSON).")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def short(object_id: str | None) -> str:
    return "(none)" if object_id is None else object_id[:12]


class progress_bar:
    """A click progress bar on stderr, or nothing when quiet/JSON/not a terminal.

    ``total`` may be unknown (None) until the first ``update_to(done, total)``.
    """

    def __init__(self, total: int | None, label: str, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.label = label
        self._bar = None
        self._done = 0
        if self.enabled and total is not None:
            self._start(total)

    def _start(self, total: int) -> None:
        self._bar = click.progressbar(length=total, label=self.label, file=sys.stderr)
        self._bar.__enter__()

    def __enter__(self):
        return self

    def update(self, n: int) -> None:
        if self._bar:
            self._bar.update(n)

    def tick(self, nbytes: int) -> None:
        """Open-ended work (bytes received or sent): a running count instead of a bar."""
        if not self.enabled:
            return
        self._done += nbytes
        sys.stderr.write(f"\r{self.label}: {human_bytes(self._done)}")
        sys.stderr.flush()

    def update_to(self, done: int, total: int) -> None:
        if self.enabled and self._bar is None:
            self._start(total)
        if self._bar:
            self._bar.update(done - self._done)
            self._done = done

    def __exit__(self, *exc):
        if self._bar:
            self._bar.__exit__(*exc)
        elif self.enabled and self._done:
            sys.stderr.write("\n")


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain aligned text table."""
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
