"""Warp / WarpTools projects in and out of a repository: tilt-series XML, ``.tomostar`` and tilt stacks.

Import reads Warp's model into ours exactly (``warp.warp_model``) and keeps
the XML itself, verbatim, as a blob the item refers to (``metadata.warp``),
so nothing Warp knows is lost: what we do not model (dose B-factor grids,
Zernike coefficients, …) travels with the item. Export writes the WarpTools layout

    tomostar/NAME.tomostar
    warp_tiltseries/NAME.xml
    warp_tiltseries/tiltstack/NAME/NAME.st

and writes the original XML back byte for byte while the item's model is
still the one it describes, so import → export → import gives the same
objects; a refined item gets a new XML built from its model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .canonical import Ref
from .errors import InvalidInputError, NotFoundError
from .formats.mrc import read_mrc, read_mrc_header, write_mrc
from .formats.star import write_star
from .formats.tilts import exposure_from_pre_exposure
from .fsutil import staged_folder
from .hashing import ObjectId
from .ingest import ItemModel, TiltSeriesDraft, add_items, items_in_source, put_tilt_series
from .physical import check_item_model
from .importers import default_tomogram_size, input_file
from .population import export_names, iter_items
from .records import DeformationModel, ImagingModel, Operation, Population, TiltSeries, validate_name
from .repository import Repository, software_version
from .warp import (XML_FIELDS, Tomostar, WarpTiltSeries, centre_shift, parse_warp_xml, read_tomostar, read_warp_xml,
                   rebuilt_warp_xml, tomostar_table, warp_model, warp_xml_text)

__all__ = ["import_warp", "export_warp"]

Progress = Callable[[int], None] | None


@dataclass
class _WarpIn:
    name: str
    xml: WarpTiltSeries | None
    tomostar: Tomostar | None
    stack: Path
    data: np.ndarray
    pixel: float
    model: dict


def _first(paths: list[Path]) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _stack_path(name: str, near: Path, given: Path | None) -> Path:
    if given is not None:
        if not given.is_file():
            raise NotFoundError("file not found", path=str(given), field="stack")
        return given
    tried = [near / "tiltstack" / name / f"{name}.st", *(near / f"{name}{ext}" for ext in
                                                          (".st", ".mrc", ".mrcs", ".stack.mrc"))]
    hit = _first(tried)
    if hit is None:
        raise NotFoundError("no tilt stack found", path=str(near), field=name, expected=[str(p) for p in tried],
                            hint="give it with --stack")
    return hit


def _tomostar_model(t: Tomostar, size_px: tuple[int, int], pixel: float, options: dict) -> dict:
    """Our model from a tomostar alone (before Warp has processed the tilt series)."""
    n = len(t.angles)
    if options.get("defocus_um") is None:
        raise InvalidInputError("the nominal defocus is unknown", path=str(t.path), field="defocus_um",
                                hint="a tomostar has no CTF: pass --defocus-um (positive = underfocus)")
    axis = t.axis_angles if t.axis_angles is not None else np.zeros(n)
    offsets = t.axis_offsets if t.axis_offsets is not None else np.zeros((n, 2))
    defocus = np.full(n, float(options["defocus_um"]) * 1e4)
    return {
        "tilt_angles_deg": -t.angles, "tilt_axis_angle_deg": float(axis[0]),
        "angle_corrections_deg": np.stack([np.zeros(n), np.zeros(n), axis - axis[0]], 1),
        "shifts_angstrom": offsets + centre_shift(size_px, pixel), "image_warp": None, "volume_warp": None,
        "orientation_corrections_deg": None,
        "defocus_u_angstrom": defocus, "defocus_v_angstrom": defocus, "defocus_angle_deg": np.zeros(n),
        "pre_exposure": t.dose.astype(np.float64), "exposure": exposure_from_pre_exposure(t.dose), "handedness": 1,
        "tilts": list(range(n)), "voltage_kv": float(options.get("voltage_kv") or 300.0),
        "spherical_aberration_mm": float(options.get("spherical_aberration_mm") or 2.7),
        "amplitude_contrast": float(options.get("amplitude_contrast") or 0.07)}


_TOMOSTAR_FIELDS = {"defocus_u_angstrom": "--defocus-um", "defocus_v_angstrom": "--defocus-um",
                    "pre_exposure": "_wrpDose", "exposure": "_wrpDose"}


def _read_one(path: Path, stack: Path | None, pixel_size: float | None, tomogram_size: list[int] | None,
              options: dict) -> _WarpIn:
    if path.suffix == ".xml":
        xml = read_warp_xml(path)
        star_path = _first([path.with_suffix(".tomostar"), path.parent.parent / "tomostar" / f"{path.stem}.tomostar"])
    elif path.suffix == ".tomostar":
        star_path = path
        xml_path = _first([path.with_suffix(".xml"), path.parent.parent / "warp_tiltseries" / f"{path.stem}.xml"])
        xml = read_warp_xml(xml_path) if xml_path else None
    else:
        raise InvalidInputError("not a Warp file", path=str(path), expected="NAME.xml or NAME.tomostar")
    name = validate_name(path.stem, "item")
    tomostar = read_tomostar(star_path) if star_path else None
    n_all = len(xml.angles) if xml is not None else len(tomostar.angles)
    if xml is not None and tomostar is not None and len(tomostar.angles) != n_all:
        raise InvalidInputError("tilt count differs between tomostar and XML", path=str(tomostar.path),
                                field="rows", expected=f"{n_all} (tilts in {xml.path.name})",
                                found=len(tomostar.angles))
    stack = _stack_path(name, xml.path.parent if xml is not None else path.parent, stack)
    shape, voxel, _ = read_mrc_header(stack)
    _, h, w = shape
    pixel = pixel_size
    if pixel is None:
        if voxel[0] > 0 and not np.isclose(voxel[0], 1.0):
            pixel = float(voxel[0])
        elif xml is not None and xml.image_angstrom is not None:
            pixel = xml.image_angstrom[0] / w
        else:
            raise InvalidInputError("the MRC header has no pixel size", path=str(stack), field="voxel size",
                                    hint="pass --pixel-size")
    if xml is not None and xml.image_angstrom is not None:
        for axis, extent, px in (("x", xml.image_angstrom[0], w), ("y", xml.image_angstrom[1], h)):
            if abs(extent - px * pixel) > pixel:  # Warp's binned stacks round the size to whole pixels
                raise InvalidInputError("pixel sizes disagree", path=str(stack), field=f"size × pixel size along {axis}",
                                        expected=f"{extent} Å (ImageDimensionsAngstrom of {xml.path.name})",
                                        found=f"{px} px × {pixel} Å = {px * pixel} Å")
    if tomogram_size is None:
        if xml is not None and xml.volume_angstrom is not None:
            tomogram_size = [int(round(v / pixel)) for v in xml.volume_angstrom]
        else:
            tomogram_size = default_tomogram_size(w, h)
    if xml is not None:
        model = warp_model(xml, pixel, image_size_px=(h, w), tomogram_size_px=list(tomogram_size),
                           defocus_um=options.get("defocus_um"))
    else:
        model = _tomostar_model(tomostar, (h, w), pixel, options)
        model["tomogram_size_px"], model["image_size_px"] = list(tomogram_size), (h, w)
        check_item_model(model, path=str(tomostar.path), fields=_TOMOSTAR_FIELDS)
    keep = model["tilts"]
    if shape[0] not in (n_all, len(keep)):
        raise InvalidInputError("tilt count differs between Warp metadata and image stack", path=str(stack),
                                field="sections", expected=f"{len(keep)} (tilts in use) or {n_all} (all tilts)",
                                found=shape[0])
    data = read_mrc(stack, mmap=True, check_finite=False).data
    if shape[0] != len(keep):
        data = data[keep]
    return _WarpIn(name, xml, tomostar, stack, data, pixel, model)


def _draft(tx: Repository, s: _WarpIn) -> TiltSeriesDraft:
    m = s.model
    warp_meta: dict = {"tilts": m["tilts"]}
    if s.xml is not None:
        warp_meta["xml"] = tx.put_blob(s.xml.raw)
    else:
        warp_meta["tomostar"] = tx.put_blob(s.tomostar.path.read_bytes())
    return TiltSeriesDraft(
        name=s.name, stack=s.data, pixel_size_angstrom=s.pixel, voltage_kv=m["voltage_kv"],
        spherical_aberration_mm=m["spherical_aberration_mm"], amplitude_contrast=m["amplitude_contrast"],
        tilt_axis_angle_deg=m["tilt_axis_angle_deg"], tilt_angles_deg=m["tilt_angles_deg"],
        exposure_e_per_angstrom2=m["exposure"], pre_exposure_e_per_angstrom2=m["pre_exposure"],
        tomogram_size_px=m["tomogram_size_px"], handedness=m["handedness"],
        model=ItemModel(m["shifts_angstrom"], m["angle_corrections_deg"], m["defocus_u_angstrom"],
                        m["defocus_v_angstrom"], m["defocus_angle_deg"], m["image_warp"], m["volume_warp"],
                        m.get("orientation_corrections_deg"), m.get("phase_shift_deg"),
                        m.get("magnification_anisotropy")),
        metadata={"acquisition_order": [int(i) for i in np.argsort(m["pre_exposure"], kind="stable")],
                  "warp": warp_meta},
        origin=str(s.xml.path if s.xml else s.tomostar.path), fields=XML_FIELDS if s.xml else _TOMOSTAR_FIELDS,
        stack_origin=str(s.stack))


def import_warp(
    repo: Repository,
    paths: list[str | Path],
    *,
    source: str,
    stacks: list[str | Path] | None = None,
    pixel_size_angstrom: float | None = None,
    tomogram_size_px: list[int] | None = None,
    defocus_um: float | None = None,
    voltage_kv: float | None = None,
    spherical_aberration_mm: float | None = None,
    amplitude_contrast: float | None = None,
    branch: str | None = None,
    message: str | None = None,
    progress: Progress = None,
) -> ObjectId:
    """Import Warp tilt series (``NAME.xml`` and/or ``NAME.tomostar`` + the tilt stack) into ``source``; one commit.

    The XML is found next to a tomostar (or in ``../warp_tiltseries``), the
    tomostar next to an XML (or in ``../tomostar``), the stack in
    ``tiltstack/NAME/NAME.st`` or ``NAME.st/.mrc/.mrcs`` beside the XML.
    Where both exist the XML is the model (Warp's own rule); a tomostar alone
    needs ``defocus_um``. Tilts with ``UseTilt = False`` are left out.
    """
    validate_name(source, "data source")
    paths = [Path(p) for p in paths]
    if stacks is not None and len(stacks) != len(paths):
        raise InvalidInputError("one stack per Warp file", field="stacks", expected=len(paths), found=len(stacks))
    options = {"defocus_um": defocus_um, "voltage_kv": voltage_kv, "spherical_aberration_mm": spherical_aberration_mm,
               "amplitude_contrast": amplitude_contrast}
    series = [_read_one(p, Path(stacks[i]) if stacks else None, pixel_size_angstrom, tomogram_size_px, options)
              for i, p in enumerate(paths)]
    names = [s.name for s in series]
    if len(set(names)) != len(names):
        raise InvalidInputError("two Warp files name the same tilt series", field="paths", found=sorted(names))
    existing = items_in_source(repo, branch, source)
    files = {}
    with repo.transaction() as tx:
        refs = {s.name: put_tilt_series(tx, _draft(tx, s), progress) for s in series}
        origins = {s.name: str(s.xml.path if s.xml else s.tomostar.path) for s in series}
        for s in series:
            for role, p in (("xml", s.xml.path if s.xml else None), ("tomostar", s.tomostar.path if s.tomostar
                                                                      else None), ("stack", s.stack)):
                if p is not None:
                    files[str(p)] = input_file(p, role=role, item=s.name)
        inputs = {f"{v['role']}:{Path(k).name}": tx.put_blob(Path(k).read_bytes()) for k, v in files.items()
                  if v["role"] != "stack"}
        operation = Operation(kind="import", software=software_version(), inputs=inputs, parameters={
            "what": "warp", "source": source, "files": files, "tilt_series": names,
            "pixel_size_angstrom": {s.name: s.pixel for s in series}})

        def update(pop: Population | None) -> Population:
            return add_items(tx, pop, source, refs, existing, origins)

        return tx.commit(update, message=message or f"Import {len(series)} Warp tilt series into {source}",
                         operation=operation, branch=branch)


# --------------------------------------------------------------------------- export


def _item_model(repo: Repository, item: TiltSeries) -> dict:
    deformation = repo.get_record(item.deformation, DeformationModel)
    imaging = repo.get_record(item.imaging, ImagingModel)
    n = item.n_tilts

    def arr(ref) -> np.ndarray:
        return np.asarray(repo.get_array(ref).read(), dtype=np.float64)
    return {
        "tilt_angles_deg": np.array(item.tilt_angles_deg), "tilt_axis_angle_deg": item.tilt_axis_angle_deg,
        "angle_corrections_deg": arr(deformation.tilt_angle_corrections_deg).reshape(n, 3),
        "shifts_angstrom": arr(deformation.tilt_shifts_angstrom).reshape(n, 2),
        "image_warp": None if deformation.image_warp is None else arr(deformation.image_warp.values),
        "volume_warp": None if deformation.volume_warp is None else arr(deformation.volume_warp.values),
        "orientation_corrections_deg": None if deformation.orientation_corrections_deg is None
        else arr(deformation.orientation_corrections_deg).reshape(n, 3),
        "defocus_u_angstrom": arr(imaging.defocus_u_angstrom), "defocus_v_angstrom": arr(imaging.defocus_v_angstrom),
        "defocus_angle_deg": arr(imaging.defocus_angle_deg),
        "pre_exposure": np.array(item.pre_exposure_e_per_angstrom2),
        "exposure": np.array(item.exposure_e_per_angstrom2), "handedness": item.handedness,
        "image_size_px": tuple(repo.get_array(item.stack).shape[1:]), "tomogram_size_px": list(item.tomogram_size_px),
        "voltage_kv": item.voltage_kv, "spherical_aberration_mm": item.spherical_aberration_mm,
        "amplitude_contrast": item.amplitude_contrast,
        "phase_shift_deg": None if imaging.phase_shift_deg is None else arr(imaging.phase_shift_deg),
        "magnification_anisotropy": imaging.magnification_anisotropy}


def _same_model(a: dict, b: dict) -> bool:
    for key, value in a.items():
        other = b.get(key)
        if value is None or other is None:
            if value is not other:
                return False
        elif not np.array_equal(np.asarray(value, dtype=np.float64), np.asarray(other, dtype=np.float64)):
            return False
    return True


def export_warp(repo: Repository, rev: str, out: str | Path, *,
                progress: Callable[[str], None] | None = None) -> dict:
    """Write every tilt series at ``rev`` in WarpTools' layout in the new folder ``out``; returns a summary.

    A failure leaves nothing behind (written into a hidden folder, then renamed).
    """
    population = repo.population(repo.resolve(rev))
    items = {key: item for key, _, item in iter_items(repo, population)}
    names = export_names(sorted(items))
    notes: list[str] = []
    with staged_folder(Path(out)) as staging:
        for sub in ("tomostar", "warp_tiltseries"):
            (staging / sub).mkdir()
        for key in sorted(items):
            item, name = items[key], names[key]
            if progress:
                progress(f"tilt series {key}")
            model = _item_model(repo, item)
            warp = item.metadata.get("warp", {})
            original = stored = None
            if isinstance(warp.get("xml"), Ref):
                stored = repo.get_blob(warp["xml"])
                original = parse_warp_xml(stored, f"{key} (stored XML)")
                again = warp_model(original, item.pixel_size_angstrom, image_size_px=model["image_size_px"],
                                   tomogram_size_px=model["tomogram_size_px"],
                                   # an XML without a CTF estimate was imported with one --defocus-um for all
                                   defocus_um=float(model["defocus_u_angstrom"][0] + model["defocus_v_angstrom"][0])
                                   / 2e4)
                if again["tilts"] != warp.get("tilts") or not _same_model(
                        {k: v for k, v in again.items() if k != "tilts"}, model):
                    original = None
            rebuilt = None if original is not None or stored is None else \
                rebuilt_warp_xml(stored, model, item.pixel_size_angstrom)
            if rebuilt is not None:
                text, more = rebuilt
                notes.extend(f"{key}: {m}" for m in more)
                notes.append(f"{key}: refined since import; its Warp XML carries the current model, and every "
                             "element the model does not hold (dose grids, power spectra, Warp's options) as Warp "
                             "wrote it")
                original = parse_warp_xml(text.encode("utf-8"), f"{key} (rebuilt XML)")
            elif original is None and stored is not None:
                notes.append(f"{key}: refined since import, and its Warp XML has tilts the item leaves out: the "
                             "XML is written afresh from the current model (Warp's other elements are not carried "
                             "over)")
            if original is None:
                text, more = warp_xml_text(model, item.pixel_size_angstrom,
                                           [f"{name}_{i:03d}.mrc" for i in range(item.n_tilts)])
                notes.extend(f"{key}: {m}" for m in more)
                original = parse_warp_xml(text.encode("utf-8"), f"{key} (rebuilt XML)")
            (staging / "warp_tiltseries" / f"{name}.xml").write_bytes(original.raw)
            if item.half_set_models:
                notes.append(f"{key}: the per-half-set models of the gold-standard refinement are not exported "
                             "(Warp has one model per tilt series); the item's shared model is")
            movies = original.movie_paths
            if len(movies) != len(original.angles):
                movies = [f"{name}_{i:03d}.mrc" for i in range(len(original.angles))]
            write_star(staging / "tomostar" / f"{name}.tomostar", {"": tomostar_table(movies, original)})
            stack_dir = staging / "warp_tiltseries" / "tiltstack" / name
            stack_dir.mkdir(parents=True)
            write_mrc(stack_dir / f"{name}.st", repo.get_array(item.stack).read(), item.pixel_size_angstrom,
                      stack=True)
    return {"folder": str(out), "tilt_series": [names[k] for k in sorted(items)], "notes": notes}

