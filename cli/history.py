"""``status``, ``log``, ``show`` and ``diff``: reading the population and its history."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

import click
import numpy as np

from cryopool.repo import canonical
from cryopool.repo.canonical import Ref
from cryopool.repo.diff import diff_populations, weights_summary
from cryopool.repo.errors import InvalidInputError, NotFoundError
from cryopool.repo.hashing import is_object_id
from cryopool.repo.population import find_item, population_summary, refinement_marks
from cryopool.repo.records import Commit, DataSource, ParticleTable, Species, TiltSeries

from .common import Context, emit_json, handle_errors, human_bytes, json_option, short, table

__all__ = ["COMMANDS", "render_diff", "log_graph_lines", "commit_info", "species_info", "item_info"]


def _decorations(repo) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    head = repo.head()
    for name, value in repo.refs.list("refs/").items():
        label = name.removeprefix("refs/heads/").removeprefix("refs/remotes/")
        if name.startswith("refs/tags/"):
            label = "tag: " + name.removeprefix("refs/tags/")
        if head.branch and name == f"refs/heads/{head.branch}":
            label = f"HEAD -> {label}"
        out.setdefault(value, []).append(label)
    if head.branch is None and head.commit:
        out.setdefault(head.commit, []).insert(0, "HEAD")
    return out


@click.command()
@json_option
@click.pass_obj
@handle_errors
def status(obj: Context, as_json: bool) -> None:
    """Where HEAD is, and what the population holds."""
    repo = obj.repo()
    head = repo.head()
    summary = None
    commit = None
    if head.commit:
        commit = repo.get_commit(head.commit)
        summary = population_summary(repo, repo.population(head.commit))
    state = sorted(p.name for p in (repo.root / "state").iterdir()) if (repo.root / "state").is_dir() else []
    if as_json:
        emit_json({"branch": head.branch, "commit": head.commit, "population": summary, "unfinished": state})
        return
    click.echo(f"On branch {head.branch}" if head.branch else f"HEAD detached at {short(head.commit)}")
    if commit is None:
        click.echo("No commits yet: import tilt series with 'cryopool import tilt-series'.")
        return
    click.echo(f"Last commit {short(head.commit)}: {commit.message} ({commit.operation.kind}, {commit.time_utc})")
    click.echo(f"Population '{summary['name']}': {summary['data_sources']} data source(s), {summary['items']} "
               f"tilt series, {summary['tilts']} tilts, {len(summary['species'])} species")
    if summary["species"]:
        rows = [[n, s["particles"], s["symmetry"], f"{s['box_px']} px @ {s['pixel_size_angstrom']:.3g} Å",
                 "-" if s["resolution_angstrom"] is None else f"{s['resolution_angstrom']:.2f} Å"]
                for n, s in summary["species"].items()]
        click.echo(table(rows, ["species", "particles", "sym", "box", "resolution"]))
    marks = refinement_marks(repo.population(head.commit))
    if marks:
        click.echo(f"Marked for re-refinement by a merge: {', '.join(marks)} (run 'cryopool refine')")
    for name in state:
        click.echo(f"Unfinished operation: {name} (see 'cryopool resolve')")


@dataclass
class GraphRow:
    """One commit's place in ``log --graph``: connector lines drawn before it, its own prefix, and after it."""

    before: list[str]
    prefix: str
    after: list[str]


def _lane_line(n: int, marks: dict[int, str]) -> str:
    """Lanes at columns 0, 2, 4, …; ``marks`` puts a character at a column (or between two, for / and \\)."""
    cells = [" "] * max(2 * n - 1, max(marks, default=-1) + 1)
    for i in range(n):
        cells[2 * i] = "|"
    for col, ch in marks.items():
        cells[col] = ch
    return "".join(cells).rstrip()


def log_graph_lines(entries: list[tuple[str, Commit]]) -> list[GraphRow]:
    """A git-style graph: one lane per open line of descent; ``|\\`` where a merge opens a lane, ``|/`` where
    two lanes meet again at their common parent."""
    lanes: list[str] = []
    rows = []
    for cid, c in entries:
        before: list[str] = []
        if cid not in lanes:
            lanes.append(cid)
        col = lanes.index(cid)
        for j in [i for i, lane in enumerate(lanes) if lane == cid and i != col][::-1]:
            before.append(_lane_line(len(lanes) - 1, {2 * j - 1: "/"}) if j == col + 1 else
                          _lane_line(len(lanes), {2 * j: "/"}))
            del lanes[j]
        prefix = _lane_line(len(lanes), {2 * col: "*"})
        parents = [p.id for p in c.parents]
        after: list[str] = []
        if parents:
            lanes[col] = parents[0]
        else:
            del lanes[col]
        for k, parent in enumerate(p for p in parents[1:] if p not in lanes[:col + 1]):
            lanes.insert(col + 1 + k, parent)
            after.append(_lane_line(len(lanes) - 1, {2 * col + 1: "\\"}))
        rows.append(GraphRow(before, prefix, after))
    return rows


@click.command()
@click.argument("rev", default="HEAD")
@click.option("--oneline", is_flag=True, help="One line per commit.")
@click.option("--graph", is_flag=True, help="Draw the version DAG on the left.")
@click.option("-n", "--max-count", type=int, help="Show at most N commits.")
@json_option
@click.pass_obj
@handle_errors
def log(obj: Context, rev: str, oneline: bool, graph: bool, max_count: int | None, as_json: bool) -> None:
    """History of REV (default HEAD), newest first."""
    repo = obj.repo()
    entries = []
    for i, entry in enumerate(repo.log(rev)):
        if max_count is not None and i >= max_count:
            break
        entries.append(entry)
    if as_json:
        emit_json({"commits": [{"id": cid, "parents": [p.id for p in c.parents], "author": c.author,
                                "time_utc": c.time_utc, "message": c.message, "operation": c.operation.kind,
                                "population": c.population.id} for cid, c in entries]})
        return
    deco = _decorations(repo)
    rows = log_graph_lines(entries) if graph else [GraphRow([], "", []) for _ in entries]
    for (cid, c), row in zip(entries, rows):
        for line in row.before:
            click.echo(line)
        prefix = row.prefix
        names = f" ({', '.join(deco[cid])})" if cid in deco else ""
        lead = f"{prefix} " if prefix else ""
        if oneline:
            click.echo(f"{lead}{click.style(short(cid), fg='yellow')}{names} {c.operation.kind}: "
                       f"{c.message.splitlines()[0]}")
            for line in row.after:
                click.echo(line)
            continue
        pad = (prefix.replace("*", "|") + " ") if prefix else ""
        click.echo(f"{lead}{click.style('commit ' + cid, fg='yellow')}{names}")
        if len(c.parents) > 1:
            click.echo(f"{pad}Merge:     {' '.join(short(p.id) for p in c.parents)}")
        click.echo(f"{pad}Author:    {c.author}")
        click.echo(f"{pad}Date:      {c.time_utc}")
        click.echo(f"{pad}Operation: {c.operation.kind} ({c.operation.software})")
        click.echo(pad)
        for line in c.message.splitlines():
            click.echo(f"{pad}    {line}")
        click.echo(pad)
        for line in row.after:
            click.echo(line)


def _weights_text(w: dict | None) -> str:
    return "none" if w is None else f"{short(w['id'])} ({w['kind']}, {w['steps']} steps)"


def render_diff(d: dict) -> list[str]:
    lines = []
    for s in d["data_sources"]["added"]:
        lines.append(f"+ data source {s}")
    for s in d["data_sources"]["removed"]:
        lines.append(f"- data source {s}")
    for k in d["items"]["added"]:
        lines.append(f"+ item {k}")
    for k in d["items"]["removed"]:
        lines.append(f"- item {k}")
    for k, fields in d["items"]["changed"].items():
        lines.append(f"~ item {k}: {', '.join(fields)} changed")
    for name, info in d["species"]["added"].items():
        lines.append(f"+ species {name} ({info['particles']} particles)")
    for name in d["species"]["removed"]:
        lines.append(f"- species {name}")
    for name, info in d["species"]["changed"].items():
        text = f"~ species {name}: {', '.join(info['fields'])} changed"
        p = info.get("particles")
        if p:
            text += (f"; particles {p['before']} -> {p['after']} (+{p['added']} -{p['removed']}, "
                     f"{p['moved']} moved, {p['turned']} re-oriented)")
        if "denoiser" in info:
            text += "; denoiser " + " -> ".join(_weights_text(w) for w in info["denoiser"])
        ra, rb = info["resolution_angstrom"]
        if ra != rb:
            text += f"; resolution {'-' if ra is None else f'{ra:.2f}'} -> {'-' if rb is None else f'{rb:.2f}'} Å"
        lines.append(text)
    return lines or ["(no changes)"]


@click.command()
@click.argument("rev_a")
@click.argument("rev_b", default="HEAD")
@json_option
@click.pass_obj
@handle_errors
def diff(obj: Context, rev_a: str, rev_b: str, as_json: bool) -> None:
    """What changed in the population from REV_A to REV_B (default HEAD)."""
    repo = obj.repo()
    a, b = repo.resolve(rev_a), repo.resolve(rev_b)
    d = diff_populations(repo, repo.population(a), repo.population(b))
    if as_json:
        emit_json({"from": a, "to": b, "diff": d})
        return
    click.echo(f"diff {short(a)}..{short(b)}")
    for line in render_diff(d):
        click.echo(line)


# --------------------------------------------------------------------------- show


def _jsonable(value):
    if isinstance(value, Ref):
        return value.id
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


def commit_info(repo, cid: str) -> tuple[dict, list[str]]:
    c = repo.get_commit(cid)
    parent_pop = repo.population(c.parents[0].id) if c.parents else None
    pop = repo.population(cid)
    d = diff_populations(repo, parent_pop, pop) if parent_pop else None
    info = {"id": cid, "parents": [p.id for p in c.parents], "author": c.author, "time_utc": c.time_utc,
            "message": c.message, "population": c.population.id,
            "operation": {"kind": c.operation.kind, "software": c.operation.software,
                          "parameters": c.operation.parameters, "inputs": _jsonable(c.operation.inputs)},
            "attachments": _jsonable(c.attachments), "summary": population_summary(repo, pop), "diff": d}
    lines = [f"commit {cid}", f"Parents:    {' '.join(short(p.id) for p in c.parents) or '(root)'}",
             f"Author:     {c.author}", f"Date:       {c.time_utc}", f"Population: {short(c.population.id)}",
             f"Operation:  {c.operation.kind} ({c.operation.software})"]
    for k, v in sorted(c.operation.parameters.items()):
        if k != "files":
            lines.append(f"    {k} = {v}")
    for k, v in sorted(c.operation.parameters.get("files", {}).items()):
        # files are keyed by label (tilt-series/species import) or by path with a role (RELION, Warp)
        label = v.get("role", k) + (f" ({v['item']})" if "item" in v else "")
        name = v.get("name") or PurePath(k).name  # commits from before "name" was always recorded
        lines.append(f"    file {label}: {name} ({human_bytes(v['bytes'])}, blake3 {v['blake3'][:16]}…)")
    lines += ["", *(f"    {line}" for line in c.message.splitlines()), ""]
    lines += render_diff(d) if d else ["(root commit)"]
    return info, lines


def species_info(repo, ref) -> tuple[dict, list[str]]:
    sp = repo.get_record(ref, Species)
    t = repo.get_record(sp.particles, ParticleTable)
    half = repo.get_array(t.columns["half_set"]).read()
    idx = repo.get_array(t.columns["item_index"]).read()
    per_item = {name: int((idx == i).sum()) for i, name in enumerate(t.item_names)}
    m1 = repo.get_array(sp.half_map_1)
    info = {"id": ref.id, "name": sp.name, "symmetry": sp.symmetry, "diameter_angstrom": sp.diameter_angstrom,
            "pixel_size_angstrom": sp.pixel_size_angstrom, "box_px": m1.shape[0], "particles": t.count,
            "half_sets": [int((half == 1).sum()), int((half == 2).sum())], "particles_per_item": per_item,
            "resolution_angstrom": sp.metrics.resolution_angstrom, "mask": sp.mask is not None,
            "denoiser": weights_summary(repo, sp), "quarter_maps": sp.quarter_maps is not None,
            "reconstructed_from": [r.id for r in sp.reconstructed_from]}
    res = "-" if sp.metrics.resolution_angstrom is None else f"{sp.metrics.resolution_angstrom:.2f} Å"
    lines = [f"species {sp.name}  ({short(ref.id)})",
             f"  symmetry {sp.symmetry}, diameter {sp.diameter_angstrom:g} Å",
             f"  half-maps {m1.shape[0]}³ px at {sp.pixel_size_angstrom:g} Å/px "
             f"({m1.shape[0] * sp.pixel_size_angstrom:g} Å box), mask: {'yes' if sp.mask else 'no'}, "
             f"quarter-maps: {'yes' if sp.quarter_maps else 'no'}",
             f"  denoiser: {_weights_text(info['denoiser'])}",
             f"  resolution (FSC 0.143): {res}",
             f"  particles: {t.count} (half-sets {info['half_sets'][0]} / {info['half_sets'][1]}), "
             f"{t.temporal_samples} temporal sample(s)"]
    lines += [f"    {name}: {n}" for name, n in per_item.items()]
    lines.append(f"  reconstructed from {len(sp.reconstructed_from)} item version(s)")
    return info, lines


def item_info(repo, key: str, ref) -> tuple[dict, list[str]]:
    ts = repo.get_record(ref, TiltSeries)
    stack = repo.get_array(ts.stack)
    imaging = repo.get_record(ts.imaging)
    du = repo.get_array(imaging.defocus_u_angstrom).read()
    a = np.asarray(ts.tilt_angles_deg)
    info = {"id": ref.id, "item": key, "tilts": ts.n_tilts, "tilt_range_deg": [float(a.min()), float(a.max())],
            "image_size_px": [stack.shape[2], stack.shape[1]], "pixel_size_angstrom": ts.pixel_size_angstrom,
            "total_dose_e_per_angstrom2": float(sum(ts.exposure_e_per_angstrom2)), "voltage_kv": ts.voltage_kv,
            "spherical_aberration_mm": ts.spherical_aberration_mm, "tilt_axis_angle_deg": ts.tilt_axis_angle_deg,
            "defocus_um_range": [float(du.min() / 1e4), float(du.max() / 1e4)], "stack_bytes": stack.nbytes,
            "tomogram_size_px": ts.tomogram_size_px, "refined_against": [r.id for r in ts.refined_against]}
    deformation = repo.get_record(ts.deformation)
    grids = [g for g in ("image_warp", "volume_warp") if getattr(deformation, g) is not None]
    lines = [f"tilt series {key}  ({short(ref.id)})",
             f"  {ts.n_tilts} tilts, {a.min():+.1f}° … {a.max():+.1f}°, tilt axis {ts.tilt_axis_angle_deg:.1f}°",
             f"  images {stack.shape[2]}x{stack.shape[1]} px at {ts.pixel_size_angstrom:g} Å/px "
             f"({human_bytes(stack.nbytes)}, {stack.dtype.name})",
             f"  total dose {info['total_dose_e_per_angstrom2']:.1f} e-/Å², {ts.voltage_kv:g} kV, "
             f"Cs {ts.spherical_aberration_mm:g} mm, amplitude contrast {ts.amplitude_contrast:g}",
             f"  defocus {info['defocus_um_range'][0]:.2f} … {info['defocus_um_range'][1]:.2f} µm",
             f"  tomogram {' x '.join(str(v) for v in ts.tomogram_size_px)} px",
             f"  deformation grids: {', '.join(grids) or 'none'}; refined against "
             f"{len(ts.refined_against)} species version(s)"]
    return info, lines


def _split_rev_path(spec: str) -> tuple[str, str | None]:
    if ":" in spec:
        rev, path = spec.split(":", 1)
        return rev or "HEAD", path.strip("/")
    return spec, None


@click.command()
@click.argument("spec", default="HEAD")
@click.option("--raw", is_flag=True, help="Print the stored record itself (decoded) as JSON.")
@json_option
@click.pass_obj
@handle_errors
def show(obj: Context, spec: str, raw: bool, as_json: bool) -> None:
    """Show a commit, or REV:species/NAME, or REV:SOURCE/ITEM (or an object id with --raw)."""
    repo = obj.repo()
    if raw:
        object_id = spec if is_object_id(spec) else None
        if object_id is None:
            ids = repo.find_ids(spec) if all(ch in "0123456789abcdef" for ch in spec) else []
            object_id = ids[0] if len(ids) == 1 else repo.resolve(spec)
        kind, data = repo.store.get(object_id)
        value = canonical.decode(data) if kind.name == "RECORD" else {"kind": kind.name.lower(), "bytes": len(data)}
        emit_json({"id": object_id, "record": _jsonable(value)})
        return
    rev, path = _split_rev_path(spec)
    cid = repo.resolve(rev)
    if path is None:
        info, lines = commit_info(repo, cid)
    else:
        pop = repo.population(cid)
        parts = path.split("/")
        if parts[0] == "species" and len(parts) == 2:
            if parts[1] not in pop.species:
                raise NotFoundError(f"no species '{parts[1]}' at {short(cid)}", hint=f"known: {sorted(pop.species)}")
            info, lines = species_info(repo, pop.species[parts[1]])
        elif parts[0] == "sources" and len(parts) == 2:
            if parts[1] not in pop.data_sources:
                raise NotFoundError(f"no data source '{parts[1]}' at {short(cid)}")
            src = repo.get_record(pop.data_sources[parts[1]], DataSource)
            info = {"name": src.name, "items": sorted(src.items)}
            lines = [f"data source {src.name}: {len(src.items)} item(s)"] + [f"  {n}" for n in sorted(src.items)]
        else:
            key = "/".join(parts[1:]) if parts[0] == "items" else path
            if not key:
                raise InvalidInputError("show needs REV:species/NAME, REV:sources/NAME or REV:SOURCE/ITEM", found=spec)
            key, ref = find_item(repo, pop, key)
            info, lines = item_info(repo, key, ref)
    if as_json:
        emit_json(info)
    else:
        click.echo("\n".join(lines))


COMMANDS = [status, log, show, diff]
