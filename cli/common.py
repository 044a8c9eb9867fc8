"""What every command shares: the context, JSON output, error mapping, rendering helpers."""

from __future__ import annotations

import errno
import functools
import json
import sys
import time
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
                                 hint="free some space and run the command again: no ref moved, so nothing is "
                                      "half-done; a push, fetch or clone resumes where it stopped, and 'cryopool gc' "
                                      "removes what an interrupted command left in .cryopool/tmp")
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
    """A progress line on stderr with rate and ETA, redrawn in place; nothing when JSON or not a terminal.

    ``total`` may be unknown (None) until the first ``update_to(done, total)``;
    ``tick`` counts open-ended bytes (transfers), ``step`` names the part being done.
    """

    def __init__(self, total: int | None, label: str, enabled: bool = True, *, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.label = label
        self.total = total
        self._done = 0
        self._bytes = False
        self._what = ""
        self._start = time.monotonic()
        self._drawn = 0.0
        self._width = 0

    def __enter__(self):
        return self

    def update(self, n: int) -> None:
        self._done += n
        self._draw()

    def update_to(self, done: int, total: int) -> None:
        self._done, self.total = done, total
        self._draw()

    def tick(self, nbytes: int) -> None:
        self._bytes = True
        self.update(nbytes)

    def step(self, what: str) -> None:
        self._what = what
        self._draw(force=True)
        self._done += 1

    def show(self, done: int, total: int, what: str) -> None:
        """``done`` of ``total`` finished, now working on ``what``."""
        self._done, self.total, self._what = done, total, what
        self._draw(force=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = self._done / elapsed
        count = human_bytes(self._done) if self._bytes else str(self._done)
        speed = f"{human_bytes(int(rate))}/s" if self._bytes else f"{rate:.2f}/s"
        parts = [f"{self.label}:"]
        if self.total:
            frac = min(self._done / self.total, 1.0)
            bar = "#" * int(24 * frac)
            parts += [f"[{bar:<24}] {100 * frac:3.0f}%", f"{count}/{human_bytes(self.total) if self._bytes else self.total}"]
        else:
            parts.append(f"{count} done")
        parts.append(speed)
        if self.total and 0 < self._done < self.total:
            parts.append(f"ETA {_clock((self.total - self._done) / rate)}")
        parts.append(f"elapsed {_clock(elapsed)}")
        if self._what:
            parts.append(f"· {self._what}")
        return " ".join(parts)

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._drawn < 0.1):
            return
        self._drawn = now
        text = self.line()
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)

    def close(self) -> None:
        self.__exit__(None, None, None)

    def __exit__(self, *exc):
        if self.enabled and self._width:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain aligned text table."""
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
