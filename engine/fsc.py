"""Fourier shell correlation, resolution, spectral SNR, and the masked FSC with phase randomisation.

Shells are ``round(|k| · d)`` for ``k`` in cycles per pixel, 0 … d // 2; the
spatial frequency of shell ``s`` is ``s / (d · pixel)`` 1/Å.
"""

from __future__ import annotations

import torch

from .fourier import spatial_frequency_shells

__all__ = ["fsc", "resolution_at", "spectral_snr", "masked_fsc", "shell_frequencies", "randomise_phases"]


def fsc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """FSC of two ``(d, d, d)`` maps per shell → ``(d // 2 + 1,)``."""
    d = a.shape[-1]
    fa, fb = torch.fft.rfftn(a), torch.fft.rfftn(b)
    shells = spatial_frequency_shells(d, device=a.device)
    # rfft stores kx > 0 once for two Friedel mates; count them twice (kx = 0 and Nyquist once)
    w = torch.full(fa.shape, 2.0, device=a.device, dtype=a.dtype)
    w[..., 0] = 1.0
    if d % 2 == 0:
        w[..., -1] = 1.0
    n = d // 2 + 1
    keep = shells < n
    s = shells[keep]

    def shell_sum(x):
        return torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, s, (x * w)[keep])
    num = shell_sum((fa * fb.conj()).real)
    den = torch.sqrt(shell_sum(fa.abs() ** 2) * shell_sum(fb.abs() ** 2))
    return torch.where(den > 0, num / den.clamp(min=1e-30), torch.zeros_like(num))


def shell_frequencies(d: int, pixel_size_angstrom: float) -> torch.Tensor:
    """Spatial frequency (1/Å) of each FSC shell."""
    return torch.arange(d // 2 + 1, dtype=torch.float64) / (d * pixel_size_angstrom)


def resolution_at(curve: torch.Tensor, pixel_size_angstrom: float, threshold: float = 0.143) -> float:
    """Resolution (Å) where the curve first falls below ``threshold`` (linear interpolation between shells).

    Returns the Nyquist resolution if it never falls below.
    """
    d = (curve.shape[-1] - 1) * 2
    c = curve.detach().cpu().double()
    below = torch.nonzero(c[1:] < threshold)
    if below.numel() == 0:
        return 2 * pixel_size_angstrom
    i = int(below[0]) + 1  # first shell below
    hi, lo = c[i - 1].item(), c[i].item()
    shell = (i - 1) + (hi - threshold) / (hi - lo) if hi != lo else float(i)
    shell = max(shell, 1e-6)
    return d * pixel_size_angstrom / shell


def spectral_snr(curve: torch.Tensor, *, full_map: bool = True) -> torch.Tensor:
    """SSNR from a half-map FSC: 2 FSC / (1 − FSC) for the full map, FSC / (1 − FSC) for one half."""
    c = curve.clamp(max=0.999)
    return (2 * c if full_map else c) / (1 - c)


def randomise_phases(volume: torch.Tensor, from_shell: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The map with Fourier phases randomised beyond ``from_shell`` (amplitudes kept)."""
    d = volume.shape[-1]
    ft = torch.fft.rfftn(volume)
    shells = spatial_frequency_shells(d, device=volume.device)
    phases = torch.rand(ft.shape, generator=generator, device=volume.device, dtype=volume.dtype) * 2 * torch.pi
    random = torch.polar(ft.abs(), phases)
    ft = torch.where(shells > from_shell, random, ft)
    return torch.fft.irfftn(ft, s=volume.shape[-3:])


def masked_fsc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, *, randomise_below: float = 0.8,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """Chen et al. (2013): FSC_true = (FSC_masked − FSC_random) / (1 − FSC_random) beyond the randomisation shell.

    Phases are randomised from the shell where the unmasked FSC first drops below ``randomise_below``.
    Returns the unmasked, masked, randomised-masked and corrected curves.
    """
    unmasked = fsc(a, b)
    below = torch.nonzero(unmasked[1:] < randomise_below)
    start = int(below[0]) + 1 if below.numel() else unmasked.shape[0] - 1
    g = torch.Generator(device=a.device).manual_seed(seed)
    ra, rb = randomise_phases(a, start, g), randomise_phases(b, start, g)
    masked = fsc(a * mask, b * mask)
    rand = fsc(ra * mask, rb * mask)
    corrected = masked.clone()
    beyond = torch.arange(masked.shape[0], device=a.device) > start
    corrected[beyond] = ((masked - rand) / (1 - rand).clamp(min=1e-6))[beyond]
    return {"unmasked": unmasked, "masked": masked, "randomised": rand, "corrected": corrected,
            "randomised_from_shell": torch.tensor(start)}
