"""Figures for people: FSC curves against the truth, before and after refinement (PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window

import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_fsc_vs_truth"]


def plot_fsc_vs_truth(path: Path, pixel_size_angstrom: float, curves: dict[str, dict[str, list[float]]],
                      title: str) -> Path:
    """One panel per species: FSC(map, true map) per state (e.g. "start", "refined") vs resolution."""
    names = sorted(curves)
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        for label, curve in curves[name].items():
            d = (len(curve) - 1) * 2
            freq = [i / (d * pixel_size_angstrom) for i in range(len(curve))]
            ax.plot(freq[1:], curve[1:], label=label)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_title(name)
        ax.set_xlabel("spatial frequency (1/Å)")
        ax.set_ylabel("FSC vs true map")
        ax.set_ylim(-0.1, 1.02)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
