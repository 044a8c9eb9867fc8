"""``cryopool report``: a self-contained HTML report of a commit, for the people who judge a map by looking."""

from __future__ import annotations

from pathlib import Path

import click

from cryopool.repo.population import iter_items

from .common import Context, emit_json, handle_errors, json_option, progress_bar
from .report_pages import report_html

__all__ = ["COMMANDS"]


@click.command()
@click.argument("rev", default="HEAD")
@click.option("-o", "--output", default="cryopool-report", show_default=True, type=click.Path(file_okay=False),
              help="Folder for index.html and the figures it embeds (figures/*.svg).")
@json_option
@click.pass_obj
@handle_errors
def report(obj: Context, rev: str, output: str, as_json: bool) -> None:
    """Write an HTML report of REV: population, species (FSC, history, maps, provenance), tilt series, merges."""
    repo = obj.repo()
    out = Path(output)
    population = repo.population(rev)
    parts = 2 + len(population.species) + sum(1 for _ in iter_items(repo, population))  # report_html's steps
    with progress_bar(parts, "report", enabled=not as_json) as bar:
        html, svgs = report_html(repo, rev, progress=bar.step)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for name, svg in svgs.items():
        (out / "figures" / name).write_text(svg, encoding="utf-8")
    index = out / "index.html"
    index.write_text(html, encoding="utf-8")
    if as_json:
        emit_json({"report": str(index.resolve()), "commit": repo.resolve(rev), "figures": sorted(svgs)})
    else:
        click.echo(f"Report of {rev} ({repo.resolve(rev)[:12]}): {index.resolve()} ({len(svgs)} figures)")


COMMANDS = [report]
