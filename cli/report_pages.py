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

from cryopool.engine.records_io import load_item
from cryopool.repo import Commit, Repository, Species, TiltSeries
from cryopool.repo.population import find_item, iter_items, population_summary
from cryopool.repo.version import __version__

from . import figures
from .common import human_bytes
from .history import item_info, log_graph_lines, species_info
from .report_data import (HistoryEntry, collisions_in, exposure_weights, history_of, merge_collisions,
                          particles_by_item, provenance_graph, species_history, stored_tomograms)
from .svg_graph import dag_svg

__all__ = ["Links", "render", "overview_section", "species_section", "item_section", "report_html",
           "log_rows", "json_text", "history_of", "LOG_ROWS"]

LOG_ROWS = 200  # commits shown in a log

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


def overview_section(repo: Repository, rev: str, particles: dict[str, dict[str, dict]] | None = None) -> dict:
    """The population at a glance: sources, items, species and particle counts per item."""
    pop = repo.population(rev)
    particles = particles_by_item(repo, pop) if particles is None else particles
    per_item = {key: {name: len(s["ids"]) for name, s in by_species.items()} for key, by_species in particles.items()}
    return {"summary": population_summary(repo, pop), "species_names": sorted(pop.species), "items": per_item,
            "sources": sorted(pop.data_sources)}


def species_section(repo: Repository, history: list[HistoryEntry], name: str, links: Links) -> dict:
    """Species ``name`` as of the newest commit of ``history``."""
    ref = history[0].species[name]
    sp = repo.get_record(ref, Species)
    info, _ = species_info(repo, ref)
    versions = species_history(repo, history, name)
    out = {"name": name, "info": info, "history": versions, "figures": {}}
    if sp.metrics.fsc is not None:
        fsc = repo.get_array(sp.metrics.fsc).read().reshape(-1, 2)
        out["figures"]["fsc"] = figures.fsc_figure({"half-map FSC": (fsc[:, 0], fsc[:, 1])},
                                                   {"half-map FSC": sp.metrics.resolution_angstrom},
                                                   f"{name}: FSC between half-maps (as recorded)")
    if any(v["resolution_angstrom"] is not None for v in versions):
        out["figures"]["history"] = figures.resolution_history_figure(versions, name)
    out["figures"]["maps"] = figures.map_sections_figure(repo.get_array(sp.half_map_1).read(),
                                                         repo.get_array(sp.half_map_2).read(), sp.pixel_size_angstrom)
    graph = provenance_graph(repo, versions)
    out["provenance"] = dag_svg(graph.nodes, graph.edges, links.commit)
    return out


def item_section(repo: Repository, history: list[HistoryEntry], key: str, collisions: list[dict] | None = None,
                 particles: dict[str, dict[str, dict]] | None = None) -> dict:
    """Tilt series ``key`` as of the newest commit of ``history``; ``collisions`` and ``particles`` (of the whole
    population) are computed if not given."""
    pop = repo.population(history[0].id)
    _, ref = find_item(repo, pop, key)
    ts = repo.get_record(ref, TiltSeries)
    item = load_item(repo, ts, with_stack=False)  # the models as the engine reads them
    g, im = item.geometry, item.imaging
    info, _ = item_info(repo, key, ref)
    collisions = [c for c in (collisions_in(repo, pop) if collisions is None else collisions) if c["item"] == key]
    species = (particles_by_item(repo, pop) if particles is None else particles).get(key, {})
    angles = g.tilt_angles_deg.numpy()
    freq, weights = exposure_weights(item)
    size = tuple(g.tomogram_size_angstrom)
    figs = {"particles": figures.particles_figure(key, species, collisions, size),
            "tilts": figures.tilt_models_figure(angles, im.defocus_u_angstrom.numpy(), im.defocus_v_angstrom.numpy(),
                                                im.defocus_angle_deg.numpy(), g.shifts_angstrom.numpy(),
                                                g.angle_corrections_deg.numpy()),
            "exposure": figures.exposure_figure(angles, freq, weights)}
    h, w = g.image_size_px
    warp = figures.warp_figure(angles, None if g.image_warp is None else g.image_warp.numpy(),
                               None if g.volume_warp is None else g.volume_warp.numpy(),
                               (h * g.pixel_size_angstrom, w * g.pixel_size_angstrom), size)
    if warp:
        figs["warp"] = warp
    tomograms = stored_tomograms(repo, history, key)
    if tomograms:
        t = tomograms[0]
        figs["tomogram"] = figures.tomogram_figure(
            t.pop("xy"), t.pop("xz"), t["voxel_angstrom"], f"tomogram {t['id'][:8]} (bin {t['binning']}): central xy, xz")
    return {"key": key, "info": info, "collisions": collisions, "figures": figs, "tomograms": tomograms,
            "particles": {name: len(s["ids"]) for name, s in species.items()}}


def log_rows(entries: list[tuple[str, Commit]]) -> list[dict]:
    """The log's lines with their graph, for ``(id, commit)`` newest first."""
    return [{"id": cid, "before": g.before, "prefix": g.prefix, "after": g.after, "author": c.author,
             "time": c.time_utc, "message": c.message.splitlines()[0] if c.message else "",
             "operation": c.operation.kind}
            for (cid, c), g in zip(entries, log_graph_lines(entries))]


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
    history = history_of(repo, cid)  # walked once for every section
    particles = particles_by_item(repo, pop)  # read once for every tilt series
    collisions = collisions_in(repo, pop)
    overview = overview_section(repo, cid, particles)
    species = []
    for name in sorted(pop.species):
        step(f"species {name}")
        species.append(species_section(repo, history, name, links))
    items = []
    for key, _, _ in iter_items(repo, pop):
        step(f"item {key}")
        items.append(item_section(repo, history, key, collisions, particles))
    step("history")
    svgs = {f"species-{s['name']}-{k}.svg": v for s in species for k, v in s["figures"].items()}
    svgs |= {f"species-{s['name']}-provenance.svg": s["provenance"] for s in species}
    svgs |= {f"item-{i['key'].replace('/', '-')}-{k}.svg": v for i in items for k, v in i["figures"].items()}
    html = render("report.html", rev=rev, commit_id=cid, commit=commit, overview=overview, species=species,
                  items=items, merges=merge_collisions(history), collisions=collisions, links=links,
                  log=log_rows([(e.id, e.commit) for e in history[:LOG_ROWS]]),
                  operation=json_text({"kind": commit.operation.kind, "parameters": commit.operation.parameters}))
    return html, svgs
