"""Weight-free colour-layout features: Lab grids, colour self-similarity and a flag palette."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

# The flag tinctures the palette histogram counts (sRGB 0..255): the colours most flags are
# drawn in, chosen from the designs (not fitted to any ranking).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (206, 17, 38),
    "white": (255, 255, 255),
    "blue": (0, 56, 147),
    "light blue": (95, 170, 230),
    "green": (0, 122, 61),
    "yellow": (252, 209, 22),
    "black": (0, 0, 0),
    "orange": (255, 130, 0),
    "maroon": (130, 20, 50),
}

_RGB_TO_XYZ = ((0.4124, 0.3576, 0.1805), (0.2126, 0.7152, 0.0722), (0.0193, 0.1192, 0.9505))
_WHITE_D65 = (0.95047, 1.0, 1.08883)


def srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB values in 0..1, channels last ([..., 3]) -> CIE Lab (D65), channels last."""
    rgb = rgb.float().clamp(0.0, 1.0)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    xyz = linear @ m.T / torch.tensor(_WHITE_D65, dtype=rgb.dtype, device=rgb.device)
    eps = 216.0 / 24389.0
    f = torch.where(xyz > eps, xyz.clamp(min=eps) ** (1.0 / 3.0), (24389.0 / 27.0 * xyz + 16.0) / 116.0)
    light = 116.0 * f[..., 1] - 16.0
    a = 500.0 * (f[..., 0] - f[..., 1])
    b = 200.0 * (f[..., 1] - f[..., 2])
    return torch.stack([light, a, b], dim=-1)


def _cells_lab(rgb: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """[N, 3, H, W] sRGB 0..1 -> [N, h*w, 3] Lab of the h x w cells' mean colours."""
    cells = F.adaptive_avg_pool2d(rgb.float(), (int(grid[0]), int(grid[1])))
    return srgb_to_lab(cells.flatten(2).transpose(1, 2))


def _grids(settings: Mapping[str, Any], key: str) -> list[tuple[int, int]]:
    return [(int(h), int(w)) for h, w in settings[key]]


def layout_dim(settings: Mapping[str, Any]) -> int:
    """The vector width `colour_layout(..., settings)` returns."""
    grids = sum(3 * h * w for h, w in _grids(settings, "grids"))
    ssm = sum((h * w) * (h * w - 1) // 2 for h, w in _grids(settings, "ssm_grids"))
    return grids + ssm + len(PALETTE)


def colour_layout(rgb: torch.Tensor, settings: Mapping[str, Any]) -> torch.Tensor:
    """[N, 3, H, W] sRGB in 0..1 -> [N, layout_dim] unit vectors, the concatenation of equally
    weighted, L2-normalised blocks (so cosine similarity is the mean of the blocks' cosines):

    - `grids` (one block together): the Lab colour (L centred on 50, /100) of each cell of an
      h x w grid, for each grid: where which colour is, at several scales;
    - `ssm_grids` (one block each): for every pair of cells of the grid, exp(-dE^2/sigma^2) - 0.5
      with dE the Lab distance (`ssm_sigma`): which parts share a colour, whatever the colour
      (the layout: bands, cross, canton), so a tricolour with permuted colours still matches;
    - the palette histogram: each pixel's soft membership (softmax of -dE/`palette_tau`) in the
      PALETTE tinctures, averaged, square-rooted: which colours, wherever they are.
    """
    n = rgb.shape[0]
    grid_parts = []
    for grid in _grids(settings, "grids"):
        lab = _cells_lab(rgb, grid)
        lab = (lab - torch.tensor([50.0, 0.0, 0.0], device=lab.device)) / 100.0
        grid_parts.append(F.normalize(lab.reshape(n, -1), dim=1))
    blocks = [torch.cat(grid_parts, dim=1) / math.sqrt(len(grid_parts))]
    sigma = float(settings["ssm_sigma"])
    for grid in _grids(settings, "ssm_grids"):
        lab = _cells_lab(rgb, grid)
        d2 = torch.cdist(lab, lab).pow(2)
        iu = torch.triu_indices(lab.shape[1], lab.shape[1], offset=1, device=lab.device)
        sim = torch.exp(-d2[:, iu[0], iu[1]] / sigma**2) - 0.5
        blocks.append(F.normalize(sim, dim=1))
    pixels = srgb_to_lab(rgb.float().flatten(2).transpose(1, 2))  # [N, H*W, 3]
    palette = srgb_to_lab(torch.tensor(list(PALETTE.values()), dtype=torch.float32,
                                       device=rgb.device) / 255.0)
    member = torch.softmax(-torch.cdist(pixels, palette.expand(n, -1, -1))
                           / float(settings["palette_tau"]), dim=2)
    blocks.append(F.normalize(member.mean(dim=1).sqrt(), dim=1))
    return torch.cat(blocks, dim=1) / math.sqrt(len(blocks))
