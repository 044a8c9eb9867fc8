"""Figures for people (matplotlib, no display): FSC, resolution history, maps, particles, per-tilt models.

Each function returns an SVG document as text (text kept as text, so pages stay
searchable) or writes a PNG; the inputs are the numbers ``report_data`` read
from the records.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Circle, Rectangle  # noqa: E402

__all__ = ["fsc_figure", "plot_fsc_vs_truth", "tomogram_figure", "resolution_history_figure", "map_sections_figure",
           "particles_figure", "tilt_models_figure", "warp_figure", "exposure_figure"]

COLOURS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _svg(fig) -> str:
    buf = io.StringIO()
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "cryopool"}):  # same figure, same bytes
        fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # inline-able: no XML prolog or doctype


def _angstrom_axis(ax, freq_max: float) -> None:
    """Spatial frequency axis labelled in Å (resolution), with 1/Å on top."""
    ax.set_xlim(0, freq_max)
    ticks = [f for f in np.linspace(0, freq_max, 6)[1:]]
    ax.set_xticks(ticks, [f"{1 / f:.1f}" for f in ticks])
    ax.set_xlabel("resolution (Å)")
    top = ax.secondary_xaxis("top")
    top.set_xlabel("spatial frequency (1/Å)", fontsize=8)
    top.tick_params(labelsize=7)


def _fsc_axes(ax, curves: dict[str, tuple[np.ndarray, np.ndarray]], marks: dict[str, float | None],
              ylabel: str) -> None:
    freq_max = max(float(np.max(f)) for f, _ in curves.values())
    for (label, (freq, fsc)), colour in zip(curves.items(), COLOURS):
        ax.plot(freq[1:], fsc[1:], label=label, color=colour)
        res = marks.get(label)
        if res:
            ax.axvline(1 / res, color=colour, lw=0.8, ls=":")
    for level in (0.5, 0.143):
        ax.axhline(level, color="grey", lw=0.8, ls="--")
        ax.text(freq_max, level, f" {level:g}", va="center", ha="left", fontsize=8, color="grey")
    ax.set_ylim(-0.1, 1.02)
    ax.set_ylabel(ylabel)
    _angstrom_axis(ax, freq_max)
    ax.legend(fontsize=8)


def fsc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], marks: dict[str, float | None], title: str) -> str:
    """FSC curves (label → (1/Å, FSC)) with the 0.143 and 0.5 lines and each curve's recorded resolution."""
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    _fsc_axes(ax, curves, marks, "FSC")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _svg(fig)


def plot_fsc_vs_truth(path: Path, pixel_size_angstrom: float, curves: dict[str, dict[str, list[float]]],
                      title: str) -> Path:
    """One panel per species: FSC(map, true map) per state (e.g. "start", "refined"), as a PNG."""
    names = sorted(curves)
    fig, axes = plt.subplots(1, len(names), figsize=(4.8 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        series = {}
        for label, curve in curves[name].items():
            d = (len(curve) - 1) * 2
            series[label] = (np.arange(len(curve)) / (d * pixel_size_angstrom), np.asarray(curve))
        _fsc_axes(ax, series, {}, "FSC vs true map")
        ax.set_title(name)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def resolution_history_figure(history: list[dict], name: str) -> str:
    """Resolution (FSC 0.143, as recorded) of each version of a species, oldest first."""
    fig, ax = plt.subplots(figsize=(5.2, 3.0))
    x = np.arange(len(history))
    res = np.array([np.nan if v["resolution_angstrom"] is None else v["resolution_angstrom"] for v in history])
    ax.plot(x, res, "o-")
    ax.set_xticks(x, [f"{v['commit'][:7]}\n{v['operation']}" for v in history], fontsize=7)
    ax.set_ylabel("resolution (Å, FSC 0.143)")
    if np.isfinite(res).any():
        ax.invert_yaxis()  # better is up
    ax.set_title(f"{name}: resolution across its versions", fontsize=10)
    fig.tight_layout()
    return _svg(fig)


def map_sections_figure(half1: np.ndarray, half2: np.ndarray, pixel_size_angstrom: float) -> str:
    """Central xy, xz, yz sections of each half-map and the projection of their sum along z."""
    fig, axes = plt.subplots(2, 4, figsize=(8.0, 4.2))
    n = half1.shape[0]
    extent = [0, n * pixel_size_angstrom, 0, n * pixel_size_angstrom]
    for row, (label, vol) in enumerate((("half 1", half1), ("half 2", half2))):
        c = [s // 2 for s in vol.shape]
        panels = [("xy", vol[c[0]]), ("xz", vol[:, c[1]]), ("yz", vol[:, :, c[2]]),
                  ("projection z", (half1 + half2).sum(axis=0))]
        for col, (title, img) in enumerate(panels):
            ax = axes[row, col]
            if row == 1 and col == 3:
                ax.axis("off")
                continue
            ax.imshow(img, cmap="gray", origin="lower", extent=extent, interpolation="nearest")
            ax.set_title(f"{label} {title}" if col < 3 else title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[1, 3].text(0.0, 0.5, f"box {n} px\n{pixel_size_angstrom:g} Å/px\n({n * pixel_size_angstrom:g} Å)",
                    fontsize=9, va="center")
    fig.tight_layout()
    return _svg(fig)


def tomogram_figure(xy: np.ndarray, xz: np.ndarray, voxel: float, title: str) -> str:
    """Central xy and xz sections of a tomogram, contrast clipped to the 1st–99th percentile."""
    lo, hi = np.percentile(np.concatenate([xy.ravel(), xz.ravel()]), [1, 99])
    ny, nx = xy.shape
    nz = xz.shape[0]
    fig, (top, side) = plt.subplots(2, 1, figsize=(5.0, 5.0 * (ny + nz) / nx + 0.6),
                                    gridspec_kw={"height_ratios": [ny, nz]}, layout="constrained")
    for ax, img, h, label in ((top, xy, ny, "y"), (side, xz, nz, "z")):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest",
                  extent=[-nx // 2 * voxel, (nx - nx // 2) * voxel, -h // 2 * voxel, (h - h // 2) * voxel])
        ax.set_ylabel(f"{label} (Å)")
    side.set_xlabel("x (Å)")
    top.set_title(title, fontsize=9)
    return _svg(fig)


def particles_figure(key: str, species: dict[str, dict], collisions: list[dict],
                     tomogram_size_angstrom: tuple[float, float, float]) -> str:
    """Particles of every species in one tomogram (top view x–y and side view x–z, Å from the tomogram centre),
    circles at their radius, the tomogram's extent dashed;
    pairs closer than a merge allows are joined by a red line and marked ×."""
    fig, (top, side) = plt.subplots(1, 2, figsize=(8.6, 4.0), gridspec_kw={"width_ratios": [1, 1]})
    sx, sy, sz = tomogram_size_angstrom
    for ax, (i, j), (w, h) in ((top, (0, 1), (sx, sy)), (side, (0, 2), (sx, sz))):
        ax.add_patch(Rectangle((-w / 2, -h / 2), w, h, fill=False, ec="grey", lw=0.8, ls="--"))  # centred
        for (name, s), colour in zip(sorted(species.items()), COLOURS):
            for p in s["positions"]:
                ax.add_patch(Circle((p[i], p[j]), s["radius"], fc=colour, ec=colour, alpha=0.35, lw=0.6))
            ax.plot([], [], "o", color=colour, alpha=0.6, label=f"{name} ({len(s['positions'])})")
        for c in collisions:
            (a, b) = c["positions"]
            ax.plot([a[i], b[i]], [a[j], b[j]], color="red", lw=1.2)
            ax.plot([(a[i] + b[i]) / 2], [(a[j] + b[j]) / 2], "x", color="red", ms=7, mew=1.6)
        ax.set_aspect("equal")
        ax.autoscale_view()
        ax.set_xlabel("x (Å)")
        ax.set_ylabel("y (Å)" if j == 1 else "z (Å)")
    if collisions:
        top.plot([], [], "x", color="red", label=f"collisions ({len(collisions)})")
    top.legend(fontsize=7, loc="upper right")
    top.set_title(f"{key}: top view", fontsize=9)
    side.set_title("side view", fontsize=9)
    fig.tight_layout()
    return _svg(fig)


def tilt_models_figure(tilt_angles: np.ndarray, defocus_u: np.ndarray, defocus_v: np.ndarray,
                       defocus_angle: np.ndarray, shifts: np.ndarray, corrections: np.ndarray) -> str:
    """Per-tilt defocus and astigmatism, image shifts and stage-angle corrections against the tilt angle."""
    order = np.argsort(tilt_angles)
    a = tilt_angles[order]
    fig, axes = plt.subplots(1, 4, figsize=(12.5, 3.2))
    axes[0].plot(a, (defocus_u[order] + defocus_v[order]) / 2e4, "o-", ms=3, label="mean (U+V)/2")
    axes[0].set_ylabel("defocus (µm)")
    axes[1].plot(a, (defocus_u[order] - defocus_v[order]), "o-", ms=3, label="U − V (Å)")
    axes[1].set_ylabel("astigmatism U − V (Å)")
    twin = axes[1].twinx()
    twin.plot(a, defocus_angle[order], ".", color=COLOURS[1], ms=4)
    twin.set_ylabel("astigmatism angle (°)", color=COLOURS[1])
    for k, label in enumerate(("x", "y")):
        axes[2].plot(a, shifts[order, k], "o-", ms=3, label=label)
    axes[2].set_ylabel("image shift (Å)")
    for k, label in enumerate(("about x", "about y", "about z")):
        axes[3].plot(a, corrections[order, k], "o-", ms=3, label=label)
    axes[3].set_ylabel("stage-angle correction (°)")
    for ax in axes:
        ax.set_xlabel("tilt angle (°)")
    for ax in (axes[2], axes[3]):
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _svg(fig)


def _quiver(ax, dx: np.ndarray, dy: np.ndarray, width: float, height: float, title: str) -> None:
    ny, nx = dx.shape
    # B-spline grid nodes span each dimension end to end (physics.md §5)
    x = np.linspace(0, width, nx) if nx > 1 else np.array([width / 2])
    y = np.linspace(0, height, ny) if ny > 1 else np.array([height / 2])
    gx, gy = np.meshgrid(x, y)
    largest = float(np.hypot(dx, dy).max())
    # the largest arrow spans a fifth of the field; no displacement at all draws the nodes only
    ax.quiver(gx, gy, dx, dy, angles="xy", scale_units="xy", scale=largest / (0.2 * width) if largest else 1.0,
              color="C0")
    ax.plot(gx.ravel(), gy.ravel(), ".", color="grey", ms=2)
    ax.set_xlim(-0.1 * width, 1.1 * width)
    ax.set_ylim(-0.1 * height, 1.1 * height)
    ax.set_aspect("equal")
    ax.set_title(f"{title}\nlargest {largest:.2f} Å", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def warp_figure(tilt_angles: np.ndarray, image_warp: np.ndarray | None, volume_warp: np.ndarray | None,
                image_size_angstrom: tuple[float, float], tomogram_size_angstrom: tuple[float, float, float]
                ) -> str | None:
    """Image-warp grids (dx, dy at grid nodes) for the lowest, flattest and highest tilt; the volume warp's
    x–y displacement in its middle z plane at the first and last exposure time. None when neither exists."""
    panels = []
    if image_warp is not None:
        t = image_warp.shape[1]
        picks = sorted({int(np.argmin(tilt_angles)), int(np.argmin(np.abs(tilt_angles))), int(np.argmax(tilt_angles))})
        for i in picks:
            grid_t = i if t == len(tilt_angles) else round(i * (t - 1) / max(len(tilt_angles) - 1, 1))
            panels.append((image_warp[0, grid_t], image_warp[1, grid_t], image_size_angstrom[1],
                           image_size_angstrom[0], f"image warp, tilt {tilt_angles[i]:+.0f}°"))
    if volume_warp is not None:
        nt, nz = volume_warp.shape[1], volume_warp.shape[2]
        for k, when in sorted({(0, "start"), (nt - 1, "end")}):
            panels.append((volume_warp[0, k, nz // 2], volume_warp[1, k, nz // 2], tomogram_size_angstrom[0],
                           tomogram_size_angstrom[1], f"volume warp, middle z, {when} of exposure"))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(2.9 * len(panels), 3.3), squeeze=False, layout="constrained")
    for ax, (dx, dy, w, h, title) in zip(axes[0], panels):
        _quiver(ax, dx, dy, w, h, title)
    return _svg(fig)


def exposure_figure(tilt_angles: np.ndarray, frequency: np.ndarray, weights: np.ndarray) -> str:
    """The engine's exposure and tilt weighting per tilt (rows by tilt angle) against spatial frequency."""
    order = np.argsort(tilt_angles)
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    im = ax.imshow(weights[order], aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1,
                   extent=[0, float(frequency[-1]), -0.5, len(order) - 0.5], interpolation="nearest")
    step = max(1, len(order) // 8)
    ax.set_yticks(range(0, len(order), step), [f"{tilt_angles[order][k]:+.0f}°" for k in range(0, len(order), step)])
    ax.set_ylabel("tilt")
    _angstrom_axis(ax, float(frequency[-1]))
    fig.colorbar(im, ax=ax, label="weight")
    ax.set_title("exposure × cos(tilt) weighting", fontsize=10)
    fig.tight_layout()
    return _svg(fig)
