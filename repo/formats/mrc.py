"""Strict MRC reading (mrcfile underneath) with errors that name the file.

mrcfile's own messages often leave out the file name and use ValueError for
everything; here each problem is a FormatError or InvalidInputError naming
the file and the header field.
"""

from __future__ import annotations

import mmap as mmap_module
import warnings
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

from ..errors import FormatError, InvalidInputError, NotFoundError

__all__ = ["MrcData", "read_mrc", "read_mrc_header", "finite_check", "write_mrc"]


@dataclass(frozen=True)
class MrcData:
    data: np.ndarray  # (z, y, x) or (n, y, x) for stacks
    voxel_size_angstrom: tuple[float, float, float]  # x, y, z
    labels: tuple[str, ...]
    file_bytes: memoryview | None = None  # the whole file, when memory-mapped (for its fingerprint)


def _open(path: Path, header_only: bool):
    if not path.is_file():
        raise NotFoundError("file not found", path=str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # mrcfile warns about damage it tolerates; we do not
            return mrcfile.open(path, mode="r", permissive=False, header_only=header_only)
    except (ValueError, RuntimeWarning, OSError, EOFError) as exc:
        msg = str(exc)
        if "bytes" in msg and ("Expected" in msg or "read enough" in msg):
            raise FormatError(f"truncated MRC file ({msg})", path=str(path), field="data block") from None
        raise FormatError(f"not a valid MRC file ({msg})", path=str(path), field="header") from None


def read_mrc_header(path: str | Path) -> tuple[tuple[int, ...], tuple[float, float, float], np.dtype]:
    """Shape (z/n, y, x), voxel size (x, y, z) in Å and data type, without reading the data."""
    path = Path(path)
    with _open(path, header_only=True) as mrc:
        h = mrc.header
        shape = (int(h.nz), int(h.ny), int(h.nx))
        vs = mrc.voxel_size
        try:
            dtype = mrcfile.utils.data_dtype_from_header(h)
        except ValueError as exc:
            raise FormatError(f"unsupported MRC mode ({exc})", path=str(path), field="mode") from None
        return shape, (float(vs.x), float(vs.y), float(vs.z)), np.dtype(dtype)


def finite_check(path: Path):
    """A per-chunk check for :func:`write_array`: NaN/inf fail with the voxel's position in the file."""
    def check(block: np.ndarray, origin: tuple[int, ...]) -> None:
        if block.dtype.kind == "f" and not np.isfinite(block).all():
            bad = ~np.isfinite(block)
            idx = tuple(int(i) + o for i, o in zip(np.argwhere(bad)[0], origin))
            raise InvalidInputError("MRC data contains NaN or infinite values", path=str(path), field="data",
                                    found=f"non-finite voxel at (z, y, x) = {idx}")
    return check


def read_mrc(path: str | Path, *, check_finite: bool = True, mmap: bool = False) -> MrcData:
    """The data and voxel size of an MRC file; NaN/inf values are refused by default.

    With ``mmap`` the data is a read-only memory map of the file (no copy):
    large tilt-series stacks are hashed and stored straight from the page cache.
    """
    path = Path(path)
    if mmap:
        with _open(path, header_only=True) as mrc:
            h = mrc.header
            dtype = np.dtype(mrcfile.utils.data_dtype_from_header(h))
            shape = (int(h.nz), int(h.ny), int(h.nx))
            offset = 1024 + int(h.nsymbt)
            vs = mrc.voxel_size
            voxel = (float(vs.x), float(vs.y), float(vs.z))
            labels = tuple(lab.decode("ascii", "replace").strip() for lab in h.label[: int(h.nlabl)])
        need = offset + int(np.prod(shape)) * dtype.itemsize
        size = path.stat().st_size
        if size < need:
            raise FormatError(f"truncated MRC file (expected {need} bytes, found {size})", path=str(path),
                              field="data block")
        if size > need:  # e.g. float32 data under a header that says int16: the header is wrong, not the data
            raise FormatError(f"MRC file is longer than its header says (expected {need} bytes for "
                              f"{shape[::-1]} voxels of {dtype}, found {size})", path=str(path), field="header")
        with open(path, "rb") as fh:  # populated up front: one kernel call instead of a page fault per page
            flags = mmap_module.MAP_SHARED | getattr(mmap_module, "MAP_POPULATE", 0)
            mapped = mmap_module.mmap(fh.fileno(), 0, flags=flags, prot=mmap_module.PROT_READ)
        file_bytes = memoryview(mapped)
        data = np.frombuffer(mapped, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
    else:
        file_bytes = None
        with _open(path, header_only=False) as mrc, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # NaN data is reported below, with its position
            data = np.asarray(mrc.data)
            vs = mrc.voxel_size
            voxel = (float(vs.x), float(vs.y), float(vs.z))
            labels = tuple(lab.decode("ascii", "replace").strip()
                           for lab in mrc.header.label[: int(mrc.header.nlabl)])
    if data.ndim == 2:
        data = data[np.newaxis]
    if check_finite:
        finite_check(path)(data, (0,) * data.ndim)
    if data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("<"))
    return MrcData(data=data, voxel_size_angstrom=voxel, labels=labels, file_bytes=file_bytes)


def write_mrc(path: str | Path, data: np.ndarray, voxel_size_angstrom: float, *, stack: bool = False) -> None:
    """A float32 MRC file (a volume, or an image stack with ``stack``) with its voxel size and a zero origin.

    Maps follow RELION's convention: the centre of the box is voxel ``n // 2`` and
    the header origin is 0, so ChimeraX and RELION place them the same way.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(data, dtype=np.float32))
        if stack:
            mrc.set_image_stack()
        mrc.voxel_size = float(voxel_size_angstrom)
        mrc.header.origin = (0.0, 0.0, 0.0)
        mrc.update_header_stats()
        mrc.header.label[0] = b"written by cryopool".ljust(80)  # no timestamp: the same data gives the same file
        mrc.header.nlabl = 1
    tmp.replace(path)
