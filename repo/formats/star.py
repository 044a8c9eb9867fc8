"""STAR tables (starfile underneath) with strict column checks.

starfile is lenient; here a missing data block or column, or a value that is
not a number where one is required, is a FormatError naming the file, the
block, the column and the (1-based) data row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from ..physical import check
from ..errors import FormatError, InvalidInputError, NotFoundError

__all__ = ["read_star_blocks", "require_table", "numeric_column", "string_column", "write_star"]


def read_star_blocks(path: str | Path) -> dict[str, pd.DataFrame | dict]:
    path = Path(path)
    if not path.is_file():
        raise NotFoundError("file not found", path=str(path))
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=["rlnTomoName", "rlnMicrographName"])
    except Exception as exc:  # starfile raises assorted types on malformed input
        raise FormatError(f"not a readable STAR file ({type(exc).__name__}: {exc})", path=str(path)) from None
    if not blocks:
        raise FormatError("STAR file has no data blocks", path=str(path), expected="at least one data_ block")
    return blocks


def require_table(blocks: dict, path: str | Path, names: tuple[str, ...]) -> tuple[str, pd.DataFrame]:
    """The first loop table among block ``names`` (or the only table)."""
    for name in names:
        if name in blocks and isinstance(blocks[name], pd.DataFrame):
            return name, blocks[name]
    tables = [k for k, v in blocks.items() if isinstance(v, pd.DataFrame)]
    if len(tables) == 1 and "" in names:
        return tables[0], blocks[tables[0]]
    raise FormatError("STAR file lacks the data block", path=str(path),
                      expected=" or ".join(f"data_{n}" for n in names if n),
                      found=[f"data_{k}" for k in blocks])


def numeric_column(table: pd.DataFrame, column: str, path, block: str, *, finite: bool = True,
                   quantity: str | None = None) -> np.ndarray:
    """A column as float64; a bad cell is an error naming its row. ``quantity``: its physical range too."""
    if column not in table.columns:
        raise FormatError("missing column", path=str(path), field=f"data_{block}/_{column}",
                          expected=f"column _{column}", found=sorted(table.columns)[:12])
    values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
    raw = table[column]
    nan_token = raw.isna().to_numpy() | raw.astype(str).str.strip().str.lower().isin(["nan", "-nan"]).to_numpy()
    bad = np.isnan(values) & ~nan_token
    if bad.any():
        row = int(np.flatnonzero(bad)[0]) + 1
        raise FormatError("value is not a number", path=str(path), field=f"data_{block}/_{column} row {row}",
                          found=repr(raw.iloc[row - 1]))
    if finite and not np.isfinite(values).all():
        row = int(np.flatnonzero(~np.isfinite(values))[0]) + 1
        raise InvalidInputError("NaN or infinite value", path=str(path), field=f"data_{block}/_{column} row {row}",
                                found=values[row - 1])
    if quantity is not None:
        check(quantity, values, path=str(path), field=f"data_{block}/_{column}", index_label="row")
    return values


def string_column(table: pd.DataFrame, column: str, path, block: str) -> list[str]:
    if column not in table.columns:
        raise FormatError("missing column", path=str(path), field=f"data_{block}/_{column}",
                          expected=f"column _{column}", found=sorted(table.columns)[:12])
    return [str(v) for v in table[column].tolist()]


def _cell(value) -> object:
    if isinstance(value, (float, np.floating)):
        return repr(float(value))  # the shortest text that reads back to the same float64
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    return value


def write_star(path: str | Path, blocks: dict[str, pd.DataFrame | dict]) -> None:
    """Write STAR blocks (loops from data frames, single values from dicts) with floats that read back exactly.

    The file is written to a temporary name and renamed, so a reader never sees half a table.
    """
    path = Path(path)
    out: dict[str, pd.DataFrame | dict] = {}
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame):
            out[name] = pd.DataFrame({c: [_cell(v) for v in block[c].tolist()] for c in block.columns})
        else:
            out[name] = {k: _cell(v) for k, v in block.items()}
    tmp = path.with_name(path.name + ".tmp")
    starfile.write(out, tmp, overwrite=True)
    lines = tmp.read_text().splitlines(keepends=True)
    if lines and lines[0].startswith("# Created by the starfile"):  # its clock time would make exports differ
        lines[0] = "# written by cryopool\n"
    tmp.write_text("".join(lines))
    tmp.replace(path)
