"""A provenance DAG as a small SVG (layered left to right), with nodes that link where a page exists."""

from __future__ import annotations

from html import escape
from typing import Callable

import networkx as nx

__all__ = ["dag_svg"]

FILL = {"species": "#dbeafe", "operation": "#fef3c7", "item": "#dcfce7", "raw": "#e5e7eb"}
BOX_W, BOX_H, GAP_X, GAP_Y = 190, 26, 60, 12


def dag_svg(nodes: dict[str, tuple[str, str, str | None]], edges: list[tuple[str, str]],
            href: Callable[[str], str] | None = None) -> str:
    """``nodes``: id → (label, kind, commit or None); ``edges``: (newer, made-from) pairs. Newest on the left."""
    g = nx.DiGraph()
    g.add_nodes_from(nodes)
    g.add_edges_from(edges)
    layers = [sorted(layer, key=lambda n: (nodes[n][1], nodes[n][0])) for layer in nx.topological_generations(g)]
    where = {}
    for x, layer in enumerate(layers):
        for y, n in enumerate(layer):
            where[n] = (10 + x * (BOX_W + GAP_X), 10 + y * (BOX_H + GAP_Y))
    width = 20 + len(layers) * (BOX_W + GAP_X) - GAP_X
    height = 20 + max((len(layer) for layer in layers), default=0) * (BOX_H + GAP_Y)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11" class="dag">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>']
    for a, b in edges:
        (xa, ya), (xb, yb) = where[a], where[b]
        out.append(f'<line x1="{xa + BOX_W}" y1="{ya + BOX_H / 2}" x2="{xb}" y2="{yb + BOX_H / 2}" stroke="#555" '
                   f'stroke-width="1" marker-end="url(#arrow)"/>')
    for n, (label, kind, commit) in nodes.items():
        x, y = where[n]
        box = (f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="4" fill="{FILL.get(kind, "#fff")}" '
               f'stroke="#444"/><text x="{x + 6}" y="{y + 17}">{escape(label)}</text>'
               f'<title>{escape(kind)} {escape(n)}</title>')
        out.append(f'<a href="{escape(href(commit))}">{box}</a>' if href and commit else box)
    out.append("</svg>")
    return "\n".join(out)
