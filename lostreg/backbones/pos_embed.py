"""Position-embedding resampling as each family's original code does it (``--pos-interp``).

timm resamples absolute position embeddings by output size with antialias. DINO v1 and the
official DINOv2 models without registers used a scale factor with a 0.1 offset and no
antialias, so at a VOC size the same weights give different embeddings under timm. Running each
family as its own code did keeps "registers vs no registers" free of that confound;
``--pos-interp timm`` measures the confound itself.
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch
import torch.nn.functional as F

from lostreg.errors import LostregError

POS_EMBED_MODES = ("timm", "dino", "dinov2", "dinov2_reg")
POS_INTERP_CHOICES = ("original", "timm")


def effective_pos_embed_mode(mode: str, pos_interp: str = "original") -> str:
    """The resampling a model runs with: its family's ``mode``, or timm's for
    ``pos_interp="timm"``."""
    if mode not in POS_EMBED_MODES:
        raise ValueError(f"unknown pos_embed mode {mode!r}")
    if pos_interp not in POS_INTERP_CHOICES:
        raise LostregError(f"--pos-interp must be one of {', '.join(POS_INTERP_CHOICES)}, "
                         f"got {pos_interp!r}")
    return "timm" if pos_interp == "timm" else mode


def resample_patch_pos_embed(pos: torch.Tensor, new_grid: tuple[int, int], mode: str) -> torch.Tensor:
    """Resample patch position embeddings ``(1, M*M, C)`` to ``new_grid`` as ``mode``'s code does.

    * ``dino``/``dinov2``: ``F.interpolate(scale_factor=((h+0.1)/M, (w+0.1)/M), bicubic)``
      without antialias (DINO v1 and the official DINOv2 hub models without registers);
    * ``dinov2_reg`` and ``timm``: by size, bicubic, antialias on (what timm does).

    At the pretrained grid every mode is the identity.
    """
    side = int(math.isqrt(pos.shape[1]))
    if side * side != pos.shape[1]:
        raise ValueError(f"position embedding of {pos.shape[1]} tokens is not a square grid")
    rows, cols = new_grid
    if (rows, cols) == (side, side):
        return pos
    dtype = pos.dtype
    grid = pos.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if mode in ("dino", "dinov2"):
        out = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side),
                            mode="bicubic", align_corners=False)
    elif mode in ("dinov2_reg", "timm"):
        out = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=True,
                            align_corners=False)
    else:
        raise ValueError(f"unknown pos_embed mode {mode!r}")
    if out.shape[-2:] != (rows, cols):
        raise RuntimeError(f"interpolated grid {tuple(out.shape[-2:])} != {(rows, cols)}")
    return out.permute(0, 2, 3, 1).reshape(1, rows * cols, -1).to(dtype)


def _pos_embed_like_original(self: Any, x: torch.Tensor, mode: str) -> torch.Tensor:
    """Replacement for timm's ``VisionTransformer._pos_embed`` using ``mode``'s interpolation.

    Same token layout as timm (class, registers, patches); only the resampling differs.
    """
    if x.ndim == 4:  # dynamic_img_size: patch_embed keeps the (B, rows, cols, C) grid
        batch, rows, cols, dim = x.shape
        x = x.reshape(batch, rows * cols, dim)
    else:  # fixed image size: (B, N, C) on the model's own grid
        batch = x.shape[0]
        rows, cols = (int(v) for v in self.patch_embed.grid_size)
    prefix = []
    if self.cls_token is not None:
        prefix.append(self.cls_token.expand(batch, -1, -1))
    if self.reg_token is not None:
        prefix.append(self.reg_token.expand(batch, -1, -1))
    pos = self.pos_embed
    if pos is None:  # nothing to resample (timm's pos_embed="none")
        return self.pos_drop(torch.cat(prefix + [x], dim=1))
    embedded_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
    patch_pos = resample_patch_pos_embed(pos[:, embedded_prefix:], (rows, cols), mode)
    if self.no_embed_class:
        x = torch.cat(prefix + [x + patch_pos], dim=1)
    else:
        x = torch.cat(prefix + [x], dim=1)
        x = x + torch.cat([pos[:, :embedded_prefix], patch_pos], dim=1)
    return self.pos_drop(x)


def install_pos_embed(model: torch.nn.Module, mode: str, pos_interp: str = "original") -> None:
    """Make ``model`` resample position embeddings the way its original code does (``mode``),
    or the way timm does when ``pos_interp="timm"``."""
    effective = effective_pos_embed_mode(mode, pos_interp)
    if effective == "timm":
        return
    model._pos_embed = types.MethodType(  # type: ignore[method-assign]
        lambda self, x: _pos_embed_like_original(self, x, effective), model
    )
