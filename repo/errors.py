"""The one error tree of cryopool.

Grouped by what a handler would do (after icechunk): a missing thing, a lost
race, a corrupted object, bad input.  Every error can carry the file/object it
is about, the field, what was expected and what was found, and the message
always names them, so a user never has to guess which file or row is wrong.
"""

from __future__ import annotations

__all__ = [
    "CryopoolError",
    "NotFoundError",
    "AlreadyExistsError",
    "ConflictError",
    "LockedError",
    "IntegrityError",
    "FormatError",
    "InvalidInputError",
]


class CryopoolError(Exception):
    """Root of every error cryopool raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        field: str | None = None,
        expected: object = None,
        found: object = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.field = field
        self.expected = expected
        self.found = found
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        parts = []
        if self.path:
            parts.append(f"{self.path}")
        if self.field:
            parts.append(f"field '{self.field}'")
        text = ": ".join(parts + [self.message]) if parts else self.message
        if self.expected is not None:
            text += f"; expected {self.expected}"
        if self.found is not None:
            text += f", found {self.found}" if self.expected is not None else f"; found {self.found}"
        return text


class NotFoundError(CryopoolError, KeyError):
    """An object, ref, repository or name does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class AlreadyExistsError(CryopoolError):
    """Creating something that is already there (a branch, a repository)."""


class ConflictError(CryopoolError):
    """A compare-and-swap lost a race, or a merge needs a decision."""


class LockedError(CryopoolError):
    """A lock could not be taken within the allowed time."""


class IntegrityError(CryopoolError):
    """Stored content does not hash to its id, or is structurally damaged."""


class FormatError(CryopoolError, ValueError):
    """An input or stored file does not follow its format (MRC, STAR, record)."""


class InvalidInputError(CryopoolError, ValueError):
    """A value is well-formed but not acceptable (NaN coordinates, bad names)."""
