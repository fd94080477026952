"""Score your own ViT with lostreg: a small ViT with registers, defined in this file.

Runs offline in seconds on the generated ``demo`` dataset (24 scenes with known boxes)::

    python examples/own_backbone.py                       # from the repository root
    python -m lostreg.run --model py:examples/own_backbone.py:build --dataset demo --weights random

The model is **randomly initialised**, so every number below is a smoke or scratch figure (the
pipeline working), never a result: ``weights="random"`` marks the first run as a smoke run, and
the training-loop looks are ``scratch=True`` runs. Neither ever enters the leaderboard. With
trained weights, drop ``weights="random"`` (or pass ``--weights your_checkpoint.pth``) and the
run becomes a leaderboard row.

The model only has to follow the usual attention layout (``blocks[i].attn.qkv``, a fused
``nn.Linear`` giving q, k, v of ``num_heads x head_dim`` each, and ``attn.num_heads``), so
lostreg reads its keys with hooks exactly as for the named backbones, checks that layout on a
probe batch, and strips the class and register tokens (``num_prefix_tokens``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lostreg


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)  # q, k, v; each num_heads x head_dim
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        weights = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyRegViT(nn.Module):
    """A ViT with a class token and ``num_register_tokens`` registers (Darcet et al. 2024),
    running at any image size: its position embeddings are resampled to each image's grid."""

    def __init__(self, patch_size: int = 16, dim: int = 96, depth: int = 4, num_heads: int = 6,
                 num_register_tokens: int = 4, train_grid: int = 14) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.num_prefix_tokens = 1 + num_register_tokens  # class, then registers, then patches
        self.patch_embed = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.reg_token = nn.Parameter(torch.randn(1, num_register_tokens, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, dim, train_grid, train_grid) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(images)  # (B, dim, rows, cols)
        pos = F.interpolate(self.pos_embed, size=patches.shape[-2:], mode="bicubic",
                            align_corners=False)
        patches = (patches + pos).flatten(2).transpose(1, 2)  # row-major patch tokens
        batch = patches.shape[0]
        x = torch.cat([self.cls_token.expand(batch, -1, -1),
                       self.reg_token.expand(batch, -1, -1), patches], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)[:, 0]


def build() -> TinyRegViT:
    """The factory ``--model py:examples/own_backbone.py:build`` calls (seeded by lostreg)."""
    return TinyRegViT()


def toy_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """One step of a stand-in objective (put your own training step here): pull each image's
    class token towards the mean of its patch tokens, on random crops of noise."""
    images = torch.randn(4, 3, 64, 96)
    tokens = model.forward_features(images)
    loss = (tokens[:, 0] - tokens[:, model.num_prefix_tokens:].mean(dim=1)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=None,
                        help="where the demo scenes go (default: $LOSTREG_DATA or datasets/)")
    parser.add_argument("--output", type=Path, default=Path("results/runs"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=4, help="toy training steps")
    parser.add_argument("--every", type=int, default=2, help="score every N steps")
    args = parser.parse_args(argv)
    common = dict(dataset="demo", data_root=args.data_root, output=args.output,
                  no_progress=True, num_workers=0)

    torch.manual_seed(0)
    model = TinyRegViT().to(args.device)
    # 1. One call: LOST, TokenCut and DINO-seg on all 24 demo scenes. Random weights: a smoke run.
    result = lostreg.evaluate(model, method="lost,tokencut,dinoseg", weights="random",
                              name="tiny_reg_vit", device=args.device, **common)
    print(result)
    print(result.metrics[["method", "feature", "corloc", "n_hits", "n_images", "smoke"]]
          .to_string(index=False))

    # 2. A training loop that looks at LOST every N steps: the first 12 scenes (always the
    #    same ones, in dataset order), scratch runs (scratch-... folders, off the leaderboard).
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(1, args.steps + 1):
        loss = toy_step(model, optimizer)
        if step % args.every == 0:
            look = lostreg.evaluate(model, limit=12, scratch=True, name="tiny_reg_vit",
                                    device=args.device, **common)
            print(f"step {step}: loss {loss:.4f}, LOST CorLoc {look.corloc:.1f} on 12 scenes "
                  f"(scratch run: {look.run_dirs[0].name})")
    assert model.training and math.isfinite(loss)  # evaluate gave the model back in train mode


if __name__ == "__main__":
    main()
