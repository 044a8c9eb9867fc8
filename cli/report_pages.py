"""HTML for people: the ``report`` page and the pages of the web view, from the same sections and templates.

A section gathers one subject's numbers (``report_data``) and figures
(``figures``) into a dict a Jinja2 template renders; links are made by an
``Links`` object, so the same section links to anchors in a single report
file and to other pages in the web view.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlencode

import jinja2

from cryopool.repo import Repository
from cryopool.repo.population import find_item, population_summary
from cryopool.repo.version import __version__

from . import figures
from .common import human_bytes
from .history import item_info, log_graph_lines, species_info
from .report_data import (collisions_in, exposure_weights, item_data, item_keys, merge_collisions,
                          particles_by_item, provenance_graph, species_data, stored_tomograms)
from .svg_graph import dag_svg

__all__ = ["Links", "render", "overview_section", "species_section", "item_section", "report_html",
           "log_rows", "json_text"]

ENV = jinja2.Environment(loader=jinja2.PackageLoader("cryopool.cli", "templates"),
                         autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
ENV.filters["bytes"] = human_bytes
ENV.filters["angstrom"] = lambda v: "–" if v is None else f"{v:.2f} Å"


@dataclass
class Links:
    """Where a species, an item or a commit is shown: anchors in one report, or pages of the web view."""

    rev: str
    web: bool = False

    def species(self, name: str) -> str:
        return f"/web/species?{urlencode({'rev': self.rev, 'name': name})}" if self.web else f"#species-{name}"

    def item(self, key: str) -> str:
        return f"/web/item?{urlencode({'rev': self.rev, 'key': key})}" if self.web else f"#item-{key}"

    def commit(self, cid: str) -> str:
        return f"/web/commit?{urlencode({'rev': cid})}" if self.web else f"#commit-{cid}"


def render(template: str, **context) -> str:
    return ENV.get_template(template).render(version=__version__, **context)


def json_text(value, limit: int = 200_000) -> str:
    text = json.dumps(value, indent=1, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit] + f"\n… ({len(text) - limit} more characters)"


def overview_section(repo: Repository, rev: str) -> dict:
    """The population at a glance: sources, items, species and particle counts per item."""
    pop = repo.population(rev)
    summary = population_summary(repo, pop)
    per_item = {key: {name: len(s["ids"]) for name, s in by_species.items()}
                for key, by_species in particles_by_item(repo, pop).items()}
    return {"summary": summary, "species_names": sorted(pop.species), "items": per_item,
            "sources": sorted(pop.data_sources)}


def species_section(repo: Repository, rev: str, name: str, links: Links) -> dict:
    data = species_data(repo, rev, name)
    info, _ = species_info(repo, repo.population(rev).species[name])
    out = {"name": name, "info": info, "history": data.history, "figures": {}}
    if data.fsc is not None:
        out["figures"]["fsc"] = figures.fsc_figure({"half-map FSC": (data.fsc[:, 0], data.fsc[:, 1])},
                                                   {"half-map FSC": data.resolution_angstrom},
                                                   f"{name}: FSC between half-maps (as recorded)")
    if any(v["resolution_angstrom"] is not None for v in data.history):
        out["figures"]["history"] = figures.resolution_history_figure(data.history, name)
    out["figures"]["maps"] = figures.map_sections_figure(*data.half_maps, data.pixel_size_angstrom)
    graph = provenance_graph(repo, data.history)
    out["provenance"] = dag_svg(graph.nodes, graph.edges, links.commit)
    return out


def item_section(repo: Repository, rev: str, key: str, collisions: list[dict] | None = None,
                 particles: dict[str, dict[str, dict]] | None = None) -> dict:
    """One tilt series; ``collisions`` and ``particles`` (of the whole population) are computed if not given."""
    pop = repo.population(rev)
    data = item_data(repo, rev, key)
    info, _ = item_info(repo, key, find_item(repo, pop, key)[1])
    collisions = [c for c in (collisions_in(repo, pop) if collisions is None else collisions) if c["item"] == key]
    species = (particles_by_item(repo, pop) if particles is None else particles).get(key, {})
    freq, weights = exposure_weights(data)
    figs = {"particles": figures.particles_figure(key, species, collisions, data.tomogram_size_angstrom),
            "tilts": figures.tilt_models_figure(data.tilt_angles_deg, data.defocus_u_angstrom,
                                                data.defocus_v_angstrom, data.defocus_angle_deg,
                                                data.shifts_angstrom, data.angle_corrections_deg),
            "exposure": figures.exposure_figure(data.tilt_angles_deg, freq, weights)}
    h, w = data.image_size_px
    warp = figures.warp_figure(data.tilt_angles_deg, data.image_warp, data.volume_warp,
                               (h * data.pixel_size_angstrom, w * data.pixel_size_angstrom),
                               data.tomogram_size_angstrom)
    if warp:
        figs["warp"] = warp
    tomograms = stored_tomograms(repo, rev, key)
    if tomograms:
        t = tomograms[0]
        figs["tomogram"] = figures.tomogram_figure(
            t["xy"], t["xz"], t["voxel_angstrom"],
            f"tomogram {t['id'][:8]} (bin {t['binning']}): central xy, xz")
    tomograms = [{k: v for k, v in t.items() if k not in ("xy", "xz")} for t in tomograms]
    return {"key": key, "info": info, "collisions": collisions, "figures": figs, "tomograms": tomograms,
            "particles": {name: len(s["ids"]) for name, s in species.items()}}


def log_rows(repo: Repository, rev: str, limit: int = 200) -> list[dict]:
    entries = []
    for cid, c in repo.log(rev):
        entries.append((cid, c))
        if len(entries) >= limit:
            break
    rows = []
    for (cid, c), g in zip(entries, log_graph_lines(entries)):
        rows.append({"id": cid, "before": g.before, "prefix": g.prefix, "after": g.after, "author": c.author,
                     "time": c.time_utc, "message": c.message.splitlines()[0] if c.message else "",
                     "operation": c.operation.kind})
    return rows


def report_html(repo: Repository, rev: str, progress: Callable[[str], None] | None = None
                ) -> tuple[str, dict[str, str]]:
    """One self-contained HTML page for commit ``rev`` (every figure inline, links are anchors), and its
    figures by file name."""
    cid = repo.resolve(rev)
    links = Links(cid)
    commit = repo.get_commit(cid)
    pop = repo.population(cid)
    step = progress or (lambda what: None)
    step("overview")
    overview = overview_section(repo, cid)
    collisions = collisions_in(repo, pop)
    particles = particles_by_item(repo, pop)  # read once for every tilt series
    species = []
    for name in sorted(pop.species):
        step(f"species {name}")
        species.append(species_section(repo, cid, name, links))
    items = []
    for key in item_keys(repo, pop):
        step(f"item {key}")
        items.append(item_section(repo, cid, key, collisions, particles))
    step("history")
    svgs = {f"species-{s['name']}-{k}.svg": v for s in species for k, v in s["figures"].items()}
    svgs |= {f"species-{s['name']}-provenance.svg": s["provenance"] for s in species}
    svgs |= {f"item-{i['key'].replace('/', '-')}-{k}.svg": v for i in items for k, v in i["figures"].items()}
    html = render("report.html", rev=rev, commit_id=cid, commit=commit, overview=overview, species=species,
                  items=items, merges=merge_collisions(repo, cid), collisions=collisions,
                  log=log_rows(repo, cid), links=links,
                  operation=json_text({"kind": commit.operation.kind, "parameters": commit.operation.parameters}))
    return html, svgs
