"""A small residual 3D U-net for half-map denoising, and its weights as named arrays.

One architecture serves M's per-species noise2noise denoiser and the Blush-style prior, so a prior
can be fine-tuned into a species' denoiser. Weights travel as ``{name: float32 array}`` plus an
architecture description (never a pickle): ``weights_to_arrays`` / ``network_from_arrays``.
Volumes of any size are denoised in overlapping cubic windows blended with a raised-cosine weight
(M: 64³ windows overlapping by 24 px), each window padded to a multiple of the U-net's stride; a volume
no larger than a window is denoised whole, as the periodic box it is.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cryopool.repo import InvalidInputError

__all__ = ["UNet3D", "ARCHITECTURE", "weights_to_arrays", "network_from_arrays", "denoise_in_windows",
           "random_crops"]

ARCHITECTURE = "cryopool.unet3d/1"  # periodic: 3³ circular convolutions, LeakyReLU(0.1), average pooling, trilinear up


def _block(c_in: int, c_out: int) -> nn.Sequential:
    # circular padding: a map's box is periodic (it comes from a Fourier reconstruction), and without zero
    # borders the network cannot tell where the box centre is, so it cannot learn "a particle sits in the middle"
    # and put one into pure noise (tested: tests/engine/test_regularisers.py, the hallucination check)
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, padding=1, padding_mode="circular"), nn.LeakyReLU(0.1),
                         nn.Conv3d(c_out, c_out, 3, padding=1, padding_mode="circular"), nn.LeakyReLU(0.1))


class UNet3D(nn.Module):
    """``depth`` 2× down-samplings, ``width·2^level`` channels; predicts a correction added to the input
    (residual learning: an untrained network is close to the identity, not to zero)."""

    def __init__(self, width: int = 8, depth: int = 2) -> None:
        super().__init__()
        self.width, self.depth = width, depth
        chans = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_block(1, chans[0])] + [_block(chans[i - 1], chans[i]) for i in range(1, depth + 1)])
        self.up = nn.ModuleList([_block(chans[i + 1] + chans[i], chans[i]) for i in reversed(range(depth))])
        self.out = nn.Conv3d(chans[0], 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def stride(self) -> int:
        return 2**self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, 1, d, h, w), each a multiple of the stride
        skips = []
        h = x
        for i, block in enumerate(self.down):
            h = block(h if i == 0 else F.avg_pool3d(h, 2))
            skips.append(h)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            h = block(torch.cat([_upsample_periodic(h), skip], dim=1))
        return x + self.out(h)


def _upsample_periodic(h: torch.Tensor) -> torch.Tensor:
    """Trilinear 2× up-sampling of a periodic box (plain interpolation clamps at the borders, which tells the
    network where they are)."""
    padded = F.pad(h, (1, 1, 1, 1, 1, 1), mode="circular")
    up = F.interpolate(padded, scale_factor=2, mode="trilinear", align_corners=False)
    return up[..., 2:-2, 2:-2, 2:-2]


def weights_to_arrays(net: UNet3D) -> tuple[dict[str, np.ndarray], dict]:
    """Named float32 arrays and the architecture that reads them back."""
    arrays = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in net.state_dict().items()}
    return arrays, {"architecture": ARCHITECTURE, "width": net.width, "depth": net.depth}


def network_from_arrays(arrays: dict[str, np.ndarray], architecture: dict, *, where: str = "weights") -> UNet3D:
    """The network these arrays are the weights of; every name and shape must match the architecture."""
    if architecture.get("architecture") != ARCHITECTURE:
        raise InvalidInputError("weights of an unknown network", path=where, field="architecture",
                                expected=ARCHITECTURE, found=architecture.get("architecture"))
    net = UNet3D(int(architecture["width"]), int(architecture["depth"]))
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    found = {k: tuple(np.shape(v)) for k, v in arrays.items()}
    if expected != found:
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        raise InvalidInputError("weights do not fit the network", path=where, field="tensors",
                                expected="the U-net's names and shapes",
                                found=f"missing {missing}, unexpected {extra}, wrong shape {wrong}")
    net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in arrays.items()})
    return net


def _cosine_window(size: int, overlap: int, device, dtype) -> torch.Tensor:
    ramp = torch.ones(size, device=device, dtype=dtype)
    if overlap > 0:
        t = (torch.arange(overlap, device=device, dtype=dtype) + 0.5) / overlap
        edge = 0.5 - 0.5 * torch.cos(torch.pi * t)
        ramp[:overlap], ramp[-overlap:] = edge, edge.flip(0)
    return ramp


def _starts(n: int, window: int, step: int) -> list[int]:
    if n <= window:
        return [0]
    starts = list(range(0, n - window, step))
    return starts + [n - window]


def denoise_in_windows(fn: Callable[[torch.Tensor], torch.Tensor], volume: torch.Tensor, *, window: int = 64,
                       overlap: int = 24, stride: int = 4) -> torch.Tensor:
    """``fn`` applied to overlapping cubic windows of ``volume``, blended; windows padded to ``stride``."""
    d = volume.shape[-3:]
    win = [min(window, n) for n in d]
    out = torch.zeros_like(volume)
    total = torch.zeros_like(volume)
    weights = [_cosine_window(w, min(overlap, w // 2) if n > w else 0, volume.device, volume.dtype)
               for w, n in zip(win, d)]
    blend = weights[0][:, None, None] * weights[1][None, :, None] * weights[2][None, None, :]
    for z in _starts(d[0], win[0], win[0] - overlap):
        for y in _starts(d[1], win[1], win[1] - overlap):
            for x in _starts(d[2], win[2], win[2] - overlap):
                cut = volume[z:z + win[0], y:y + win[1], x:x + win[2]]
                pad = [(-n) % stride for n in win]
                padded = F.pad(cut[None, None], (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")
                res = fn(padded)[0, 0, :win[0], :win[1], :win[2]]
                out[z:z + win[0], y:y + win[1], x:x + win[2]] += res * blend
                total[z:z + win[0], y:y + win[1], x:x + win[2]] += blend
    return out / total


def random_crops(volumes: list[torch.Tensor], size: int, count: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The same ``count`` random cubes (with random axis flips and permutations, the cube's 48 symmetries)
    cut from each of ``volumes`` → one ``(count, 1, s, s, s)`` batch per volume."""
    d = volumes[0].shape[-1]
    size = min(size, d)
    out: list[list[torch.Tensor]] = [[] for _ in volumes]
    for _ in range(count):
        o = torch.randint(0, d - size + 1, (3,), generator=generator).tolist()
        perm = torch.randperm(3, generator=generator).tolist()
        flips = [i for i in range(3) if torch.rand(1, generator=generator).item() < 0.5]
        for acc, v in zip(out, volumes):
            c = v[o[0]:o[0] + size, o[1]:o[1] + size, o[2]:o[2] + size].permute(*perm)
            acc.append(c.flip(flips) if flips else c)
    return [torch.stack(a)[:, None] for a in out]
