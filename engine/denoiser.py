"""M's noise2noise denoiser: a U-net per species, trained on its own two half-maps.

Each half-map is an independent noisy observation of the same structure, so a network trained to
predict one half from the other learns the structure's expectation, not the noise (Lehtinen et al.,
noise2noise). As M does, the maps are spectrally whitened within the working band before training
(so every shell counts, not only the strong low frequencies), the network is trained when the
species is created and continued at every refinement from its stored weights, and each half-map is
denoised on its own in overlapping windows (M: 64³, overlap 24). The network has seen both halves
while training: that is M's accepted leak of information between the halves (measured in
``tests/engine/test_regularisers.py`` and reported in docs/physics.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fourier import spatial_frequency_radius
from .regularise import low_pass_edge
from .unet import UNet3D, denoise_in_windows, random_crops

__all__ = ["DenoiserSettings", "whitening_filter", "prepare", "train_noise2noise", "denoise_half_map"]


@dataclass(frozen=True)
class DenoiserSettings:
    """M trains 800 steps at creation and 800 more after every refinement on a GPU; on a CPU the default is
    fewer (``steps``), with the same schedule. ``crop`` is the training cube, ``batch`` cubes per step."""

    steps: int = 200
    crop: int = 32
    batch: int = 4
    learning_rate: float = 3e-4
    width: int = 8
    depth: int = 2
    window: int = 64
    overlap: int = 24
    seed: int = 0


def whitening_filter(half_maps: tuple[torch.Tensor, torch.Tensor], pixel_size_angstrom: float,
                     resolution_angstrom: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per rfft voxel, the whitening transfer (1 / the shell's RMS amplitude of the halves' average, with a soft
    edge at the working resolution, 0 beyond) and its inverse within the band (RMS × the same edge). The same
    filter for both halves, so one network fits both."""
    d = half_maps[0].shape[-1]
    radius = spatial_frequency_radius(d, device=half_maps[0].device, dtype=half_maps[0].dtype)
    shells = radius.round().long().clamp(max=d // 2)
    power = (torch.fft.rfftn((half_maps[0] + half_maps[1]) / 2).abs() ** 2)
    n = torch.zeros(d // 2 + 1, dtype=power.dtype, device=power.device).index_add_(0, shells.flatten(),
                                                                                   torch.ones_like(power).flatten())
    mean = torch.zeros_like(n).index_add_(0, shells.flatten(), power.flatten()) / n.clamp(min=1)
    rms = mean.sqrt()
    inv = torch.where(rms > rms.max() * 1e-6, 1 / rms.clamp(min=1e-30), torch.zeros_like(rms))
    edge = low_pass_edge(radius, d, pixel_size_angstrom, resolution_angstrom)
    return inv[shells] * edge, rms[shells] * edge


def _apply(volume: torch.Tensor, transfer: torch.Tensor) -> torch.Tensor:
    return torch.fft.irfftn(torch.fft.rfftn(volume) * transfer, s=volume.shape[-3:])


def train_noise2noise(net: UNet3D, half_maps: tuple[torch.Tensor, torch.Tensor], settings: DenoiserSettings, *,
                      generator: torch.Generator | None = None) -> list[float]:
    """Train ``net`` in place to predict each (whitened, standardised) half-map from the other; the loss history."""
    a, b = half_maps
    generator = generator or torch.Generator().manual_seed(settings.seed)
    crop = min(settings.crop, a.shape[-1])
    crop -= crop % net.stride
    opt = torch.optim.Adam(net.parameters(), lr=settings.learning_rate)
    losses = []
    net.train()
    for _ in range(settings.steps):
        x, y = random_crops([a, b], crop, settings.batch, generator)
        inputs, targets = torch.cat([x, y]), torch.cat([y, x])  # both directions
        loss = torch.mean((net(inputs) - targets) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    net.eval()
    return losses


def prepare(half_maps: tuple[torch.Tensor, torch.Tensor], pixel_size_angstrom: float,
            resolution_angstrom: float) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, float]:
    """The whitened, standardised half-maps, the inverse whitening transfer and the scale (to undo both)."""
    w, unwhiten = whitening_filter(half_maps, pixel_size_angstrom, resolution_angstrom)
    white = tuple(_apply(h, w) for h in half_maps)
    scale = float(torch.sqrt((white[0].var() + white[1].var()) / 2).clamp(min=1e-30))
    return (white[0] / scale, white[1] / scale), unwhiten, scale


def denoise_half_map(net: UNet3D, white: torch.Tensor, unwhiten: torch.Tensor, scale: float,
                     settings: DenoiserSettings) -> torch.Tensor:
    """One whitened, standardised half-map → denoised, in the half-map's own units, within the band."""
    with torch.no_grad():
        out = denoise_in_windows(net, white, window=settings.window, overlap=settings.overlap, stride=net.stride)
    return _apply(out * scale, unwhiten)
