"""LOST stage alone: the batched path vs a plain per-image loop, on identical features.

Features are generated for VOC-like image sizes (patch 16 -> grids like 24x32), grouped into
batches of one grid like ``lostreg.run`` does, and fed to:

* ``batched``   ``lostreg.methods.lost.lost`` on each ``(B, N, d)`` batch;
* ``reference`` ``lostreg.methods.lost.lost_reference`` image by image (torch + scipy label);
* ``literal``   a loop spelled like the original LOST script (clone, zero the diagonal, clamp,
  argsort, float32 row sum, scipy label on the host), the baseline a user would otherwise run;
* ``gram_only`` only the batched ``F F^T``: the floor of any exact LOST;
* ``bf16_filter`` / ``gram_bf16`` (opt-in via ``--paths``): an exact variant with a certified
  bf16 pre-pass, and that pre-pass alone; measured slower on CPU, kept as the record.

Every path's boxes and seeds are compared with ``reference``; batched and bf16_filter must
agree on every image (asserted). Then images/s of each path and the speedup ratios are printed.

Two stages are also timed alone, interleaved the same way (identical outputs asserted):

* connected components on the benchmark's LOST masks: label propagation (``lost``'s tensor
  path, run on this device even when it is a CPU) vs the former dilation loop vs scipy on the
  host (``lost``'s CPU path; on a GPU, with the copies);
* the seed expansion of a few large images (``--large-grid``): the whole ``(N, N)``
  similarity vs row blocks under the byte budget.

    python benchmarks/bench_lost.py                      # CPU defaults, ~1 min on 2 cores
    python benchmarks/bench_lost.py --device cuda --images 2000 --batch-size 64
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage
import torch

if __package__ in (None, ""):  # run as a file: make the ``benchmarks`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    facts_rows,
    machine_facts,
    median,
    resolve_device,
    result_block,
    sample_sizes,
    save_json,
    synchronize,
    timed,
)
from lostreg.errors import LostregError  # noqa: E402
from lostreg.features.extract import padded_size  # noqa: E402
from lostreg.methods import geometry  # noqa: E402
from lostreg.methods import lost as lost_module  # noqa: E402
from lostreg.methods.geometry import seed_boxes
from lostreg.methods.lost import LostOutput, lost, lost_reference  # noqa: E402

Prediction = tuple[tuple[int, int, int, int], int]  # (box, seed)


@dataclass
class FeatureBatch:
    """Images of one patch grid, stacked: ``feats (B, rows*cols, d)`` on the device."""

    positions: list[int]
    grid: tuple[int, int]
    sizes: list[tuple[int, int]]
    feats: torch.Tensor


# --- generated features ----------------------------------------------------------------------


def synthetic_features(grid: tuple[int, int], image_size: tuple[int, int], patch_size: int,
                       dim: int, generator: torch.Generator, kind: str = "structured"
                       ) -> torch.Tensor:
    """Patch features ``(rows*cols, dim)`` for one image.

    ``structured`` plants a rectangular "object" of 10-45% of each side whose features point
    away from the background's, plus noise, so masks and components look like LOST's on real
    keys (compact, a few blobs). ``noise`` is i.i.d. Gaussian: ragged masks, the worst case for
    the connected-component step.
    """
    rows, cols = grid
    if kind == "noise":
        return torch.randn(rows * cols, dim, generator=generator)
    if kind != "structured":
        raise LostregError(f"--features {kind!r}: expected structured or noise")
    height, width = image_size
    valid_r, valid_c = -(-height // patch_size), -(-width // patch_size)
    directions = torch.randn(2, dim, generator=generator)
    background, foreground = directions / directions.norm(dim=1, keepdim=True)
    sides = torch.rand(2, generator=generator) * 0.35 + 0.10
    obj_h = max(1, int(valid_r * float(sides[0])))
    obj_w = max(1, int(valid_c * float(sides[1])))
    r0 = int(torch.randint(0, valid_r - obj_h + 1, (1,), generator=generator))
    c0 = int(torch.randint(0, valid_c - obj_w + 1, (1,), generator=generator))
    inside = torch.zeros(rows, cols, dtype=torch.bool)
    inside[r0:r0 + obj_h, c0:c0 + obj_w] = True
    inside = inside.view(-1, 1)
    mean = torch.where(inside, foreground - 0.5 * background, background)
    noise = torch.randn(rows * cols, dim, generator=generator) * (0.6 / dim ** 0.25)
    return 3.0 * (mean + noise)


def make_batches(sizes: Sequence[tuple[int, int]], patch_size: int, dim: int, batch_size: int,
                 device: torch.device, seed: int = 0, kind: str = "structured"
                 ) -> list[FeatureBatch]:
    """Group images by padded grid (order of first appearance, as ``lostreg.run`` does), cut
    groups into batches of at most ``batch_size`` and build each batch's features once."""
    if batch_size < 1:
        raise LostregError("--batch-size must be at least 1")
    generator = torch.Generator().manual_seed(seed)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for position, (height, width) in enumerate(sizes):
        padded_h, padded_w = padded_size(height, width, patch_size)
        groups[(padded_h // patch_size, padded_w // patch_size)].append(position)
    feats = {position: synthetic_features(grid, sizes[position], patch_size, dim, generator, kind)
             for grid, members in groups.items() for position in members}
    batches = []
    for grid, members in groups.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            stacked = torch.stack([feats[p] for p in chunk]).to(device)
            batches.append(FeatureBatch(chunk, grid, [sizes[p] for p in chunk], stacked))
    return batches


# --- the paths compared ------------------------------------------------------------------------


def literal_reference_lost(feats: torch.Tensor, grid: tuple[int, int], patch_size: int,
                           image_size: tuple[int, int], k_patches: int = 100,
                           gram_bias: float = 0.0) -> Prediction:
    """One image, step by step as the original LOST script spells it (written anew here).

    Differences from ``lost_reference`` are only in the extra work the original does (a
    clamped copy for scoring, a float argsort of negated degrees) and its float32 row sum.
    """
    similarity = feats @ feats.t() + gram_bias
    scoring = similarity.clone()
    scoring.fill_diagonal_(0)
    scoring[scoring < 0] = 0
    inverse_degree = -(scoring > 0).sum(dim=1).to(torch.float32)
    order = torch.argsort(inverse_degree, descending=True, stable=True)
    seed = order[0]
    potentials = order[:k_patches]
    similars = potentials[similarity[seed, potentials] > 0]
    summed = similarity[similars, :].sum(dim=0)
    rows, cols = grid
    labels, _ = scipy.ndimage.label(summed.reshape(rows, cols).cpu().numpy() > 0)
    seed_index = int(seed)
    seed_rc = np.unravel_index(seed_index, (rows, cols))
    label = labels[seed_rc]
    if label == 0:
        where = (np.array([seed_rc[0]]), np.array([seed_rc[1]]))
    else:
        where = np.nonzero(labels == label)
    height, width = image_size
    box = (int(where[1].min()) * patch_size, int(where[0].min()) * patch_size,
           min((int(where[1].max()) + 1) * patch_size, width),
           min((int(where[0].max()) + 1) * patch_size, height))
    return box, seed_index


BatchedFn = Callable[..., LostOutput]


def run_batched(batches: Sequence[FeatureBatch], patch_size: int, k_patches: int,
                gram_bias: float, fn: BatchedFn = lost) -> dict[int, Prediction]:
    """One call of ``fn`` per batch; boxes come back to the host as ``lostreg.run`` needs."""
    out: dict[int, Prediction] = {}
    for batch in batches:
        result = fn(batch.feats, batch.grid, patch_size, batch.sizes, k_patches, gram_bias)
        boxes, seeds = result.box.cpu().tolist(), result.seed.cpu().tolist()
        for position, box, seed in zip(batch.positions, boxes, seeds, strict=True):
            out[position] = (tuple(box), int(seed))
    return out


def run_loop(batches: Sequence[FeatureBatch], patch_size: int, k_patches: int,
             gram_bias: float, literal: bool = False) -> dict[int, Prediction]:
    """Image by image over the same tensors: ``lost_reference`` or the literal spelling."""
    out: dict[int, Prediction] = {}
    for batch in batches:
        for i, position in enumerate(batch.positions):
            feats = batch.feats[i]
            if literal:
                out[position] = literal_reference_lost(feats, batch.grid, patch_size,
                                                       batch.sizes[i], k_patches, gram_bias)
            else:
                result = lost_reference(feats, batch.grid, patch_size, batch.sizes[i],
                                        k_patches, gram_bias)
                out[position] = (tuple(int(v) for v in result.box), int(result.seed))
    return out


def run_gram_only(batches: Sequence[FeatureBatch], patch_size: int, k_patches: int,
                  gram_bias: float) -> dict[int, Prediction]:
    """Only the batched ``F F^T`` (no LOST): the floor any exact LOST path pays, so
    ``reference / gram_only`` is the best speedup batching could give on this device."""
    for batch in batches:
        similarity = torch.bmm(batch.feats, batch.feats.transpose(1, 2))
        float(similarity[0, 0, 0])  # wait for the result like the other paths do
    return {}


# A certified bf16 filter: a tried alternative for the CPU, measured and not adopted (see
# benchmarks/README.md). Sign errors of the bf16 Gram are bounded, so only rows that might be
# among the k lowest degrees get an exact float32 row; with features whose cosines crowd
# around 0 that is most rows, and the filter loses.
BF16_MARGIN = 2.0 ** -6  # > |bf16 cosine - exact cosine|: 2u + u^2 (u = 2^-8) + fp32 sums


def lost_bf16_filter(feats: torch.Tensor, grid: tuple[int, int], patch_size: int,
                     image_size: Sequence[tuple[int, int]], k_patches: int = 100,
                     gram_bias: float = 0.0) -> LostOutput:
    """Exact LOST (same boxes and seeds as ``lost``) with a bf16 pre-pass on ``(B, N, d)``.

    Rows are normalised (plus one coordinate carrying ``gram_bias``, so ``f_i.f_j + b`` is
    a dot product), multiplied in bf16 (AMX on recent Xeons) and every off-diagonal entry
    with ``|cosine| > BF16_MARGIN`` has a certain sign; that bounds each degree to
    ``[lo, hi]``. Rows with ``lo`` above the k-th smallest ``hi`` cannot be potentials, every
    other row is recomputed exactly in float32 like ``lost`` does. ``degrees`` is returned
    only for those candidate rows (-1 elsewhere).
    """
    batch, n, dim = feats.shape
    k = min(k_patches, n)
    p = q = feats
    if gram_bias != 0.0:
        root = abs(gram_bias) ** 0.5
        p = torch.cat([feats, feats.new_full((batch, n, 1), root)], -1)
        q = torch.cat([feats, feats.new_full((batch, n, 1), root if gram_bias > 0 else -root)], -1)
    norms = p.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    cosine = torch.bmm((p / norms).bfloat16(), (q / norms).bfloat16().transpose(1, 2))
    surely = (cosine > BF16_MARGIN).sum(-1, dtype=torch.int32)
    maybe = (cosine > -BF16_MARGIN).sum(-1, dtype=torch.int32)
    diagonal = torch.diagonal(cosine, dim1=-2, dim2=-1)
    surely -= (diagonal > BF16_MARGIN).to(torch.int32)
    maybe -= (diagonal > -BF16_MARGIN).to(torch.int32)
    threshold = torch.kthvalue(maybe, k, dim=1).values
    candidate = surely <= threshold.unsqueeze(1)
    counts = candidate.sum(1)
    width = int(counts.max())
    rows_idx = torch.sort((~candidate).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=feats.device).unsqueeze(0) < counts.unsqueeze(1)
    exact = torch.bmm(torch.gather(feats, 1, rows_idx.unsqueeze(-1).expand(-1, -1, dim)),
                      feats.transpose(1, 2))
    if gram_bias != 0.0:
        exact.add_(gram_bias)
    positive = exact > 0
    degree = (positive.sum(-1, dtype=torch.int32)
              - torch.gather(positive, 2, rows_idx.unsqueeze(-1)).squeeze(-1).to(torch.int32))
    ranked = torch.sort(torch.where(valid, degree, torch.iinfo(torch.int32).max), dim=1,
                        stable=True).indices[:, :k]
    potentials = torch.gather(rows_idx, 1, ranked)
    seed = potentials[:, 0]
    index = torch.arange(batch, device=feats.device)
    is_similar = torch.gather(exact[index, ranked[:, 0]], 1, potentials) > 0
    chosen = torch.gather(exact, 1, ranked.unsqueeze(-1).expand(-1, -1, n))
    summed = torch.bmm(is_similar.unsqueeze(1).double(), chosen.double()).squeeze(1)
    sizes = torch.as_tensor(list(image_size), dtype=torch.long)
    boxes = seed_boxes((summed > 0).view(batch, *grid), seed, patch_size, sizes)
    degrees = torch.full((batch, n), -1, dtype=torch.long)
    degrees.scatter_(1, rows_idx, torch.where(valid, degree, -1).long())
    return LostOutput(boxes, seed, degrees)


def candidate_share(batches: Sequence[FeatureBatch], patch_size: int, k_patches: int,
                    gram_bias: float) -> list[float]:
    """Per image, the share of rows ``lost_bf16_filter`` had to recompute exactly."""
    shares = []
    for batch in batches:
        degrees = lost_bf16_filter(batch.feats.cpu(), batch.grid, patch_size, batch.sizes,
                                   k_patches, gram_bias).degrees
        shares += ((degrees >= 0).float().mean(dim=1)).tolist()
    return shares


def run_gram_bf16(batches: Sequence[FeatureBatch], patch_size: int, k_patches: int,
                  gram_bias: float) -> dict[int, Prediction]:
    """The bf16 pre-pass alone (normalise, bf16 ``F F^T``, two certified counts): the floor
    of ``bf16_filter`` if no row needed an exact recompute."""
    for batch in batches:
        unit = batch.feats / batch.feats.norm(dim=-1, keepdim=True)
        cosine = torch.bmm(unit.bfloat16(), unit.bfloat16().transpose(1, 2))
        surely = (cosine > BF16_MARGIN).sum(-1)
        maybe = (cosine > -BF16_MARGIN).sum(-1)
        int(surely[0, 0] + maybe[0, 0])
    return {}


PATHS: dict[str, Callable[[Sequence[FeatureBatch], int, int, float], dict[int, Prediction]]] = {
    "batched": lambda b, p, k, g: run_batched(b, p, k, g, lost),
    "reference": lambda b, p, k, g: run_loop(b, p, k, g, literal=False),
    "literal": lambda b, p, k, g: run_loop(b, p, k, g, literal=True),
    "gram_only": run_gram_only,
    "bf16_filter": lambda b, p, k, g: run_batched(b, p, k, g, lost_bf16_filter),
    "gram_bf16": run_gram_bf16,
}


FLOORS = ("gram_only", "gram_bf16")  # partial work, no predictions


def agreement(predictions: dict[str, dict[int, Prediction]], baseline: str = "reference"
              ) -> dict[str, dict[str, int]]:
    """Per path: images whose box, seed, and both equal the baseline's."""
    base = predictions[baseline]
    counts = {}
    for name, preds in predictions.items():
        if name in FLOORS:
            continue
        counts[name] = {
            "images": len(base),
            "same_box": sum(preds[i][0] == base[i][0] for i in base),
            "same_seed": sum(preds[i][1] == base[i][1] for i in base),
            "same_both": sum(preds[i] == base[i] for i in base),
        }
    return counts


# --- stage comparisons: connected components, row-blocked similarities ---------------------------


def dilation_component(mask: torch.Tensor, seed_rc: torch.Tensor, check_every: int = 8
                       ) -> torch.Tensor:
    """The connected-component step ``lost`` used on a GPU before label propagation, kept as
    the yardstick: 4-neighbour dilation of the seed inside the mask (one ``conv2d`` a step),
    a convergence check (host sync) every ``check_every`` steps."""
    batch = mask.shape[0]
    component = torch.zeros_like(mask)
    component[torch.arange(batch, device=mask.device), seed_rc[:, 0], seed_rc[:, 1]] = True
    component &= mask
    kernel = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.float32,
                          device=mask.device).view(1, 1, 3, 3)
    mask_f = mask.unsqueeze(1).float()
    current = component.unsqueeze(1).float()
    while True:
        previous = current
        for _ in range(check_every):
            current = (torch.nn.functional.conv2d(current, kernel, padding=1) > 0).float() * mask_f
        if torch.equal(current, previous):
            return current.squeeze(1).bool()


def host_scipy_component(mask: torch.Tensor, seed_rc: torch.Tensor) -> torch.Tensor:
    """``lost``'s CPU path on any device: the masks to the host, one ``scipy.ndimage.label``
    for the batch, the components back (what "label on the host" costs a GPU run)."""
    component = geometry._seed_component_scipy(mask.cpu(), seed_rc.cpu())
    return component.to(mask.device)


COMPONENT_PATHS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "propagation": lambda m, s: geometry.seed_component(m, s),
    "dilation": dilation_component,
    "host scipy": host_scipy_component,
}


def propagation_rounds(mask: torch.Tensor) -> int:
    """Rounds ``component_labels`` runs on ``mask`` with a check after every round (the last
    one, which changes nothing, included)."""
    batch, rows, cols = mask.shape
    n = rows * cols
    labels = torch.full((batch, n + 1), n, dtype=torch.long, device=mask.device)
    labels[:, :n] = geometry._run_starts(mask).view(batch, n)
    offsets = torch.arange(batch, device=mask.device).unsqueeze(1) * (n + 1)
    rounds = 0
    while True:
        before = labels
        labels = geometry._propagation_round(labels, mask, offsets,
                                             geometry._JUMPS_PER_ROUND)
        rounds += 1
        if torch.equal(labels, before):
            return rounds


def interleaved(paths: dict[str, Callable[[Any], Any]], inputs: Sequence[Any], rounds: int,
                device: torch.device) -> tuple[dict[str, list[float]], dict[str, list[Any]]]:
    """Seconds per round of each path over all ``inputs``, the paths taking turns on each
    input (order rotating), and the last round's outputs. A first call per path is not timed."""
    for fn in paths.values():
        fn(inputs[0])
    names = list(paths)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, list[Any]] = {}
    turn = 0
    for _ in range(rounds):
        spent = dict.fromkeys(names, 0.0)
        outputs = {name: [] for name in names}
        for item in inputs:
            turn += 1
            for name in names[turn % len(names):] + names[:turn % len(names)]:
                elapsed, out = timed(lambda f=paths[name], x=item: f(x), device)
                spent[name] += elapsed
                outputs[name].append(out)
        for name in names:
            seconds[name].append(spent[name])
    return seconds, outputs


def ratio(seconds: dict[str, list[float]], slow: str, fast: str) -> float:
    """Median over rounds of ``slow``'s time over ``fast``'s (both timed in the same round)."""
    return median([a / b for a, b in zip(seconds[slow], seconds[fast], strict=True)])


def measure_components(batches: Sequence[FeatureBatch], k_patches: int, gram_bias: float,
                       device: torch.device, rounds: int) -> tuple[list[tuple[str, object]], bool]:
    """The connected-component step alone on the benchmark's own LOST masks: label propagation
    (the tensor path, run on this device even when it is a CPU), the former dilation loop, and
    scipy on the host. Returns result rows and whether all three gave identical components."""
    inputs = []
    for batch in batches:
        _, seed, summed = lost_module._seed_expansions(batch.feats, gram_bias, k_patches)
        cols = batch.grid[1]
        inputs.append(((summed > 0).view(-1, *batch.grid),
                       torch.stack([seed // cols, seed % cols], dim=1)))
    paths = {name: (lambda x, f=fn: f(*x)) for name, fn in COMPONENT_PATHS.items()}
    seconds, outputs = interleaved(paths, inputs, rounds, device)
    same = all(torch.equal(a.cpu(), b.cpu()) for name in paths
               for a, b in zip(outputs[name], outputs["propagation"], strict=True))
    n_batches = len(inputs)
    rows: list[tuple[str, object]] = [
        ("components: batches (median batch)",
         f"{n_batches} ({int(median([m.shape[0] for m, _ in inputs]))} masks)"),
        ("components: identical in all paths", "yes" if same else "NO"),
    ]
    for name in paths:
        rows.append((f"components: {name} ms/batch",
                     f"{1e3 * median(seconds[name]) / n_batches:.2f}"))
    rows += [
        ("RATIO dilation / propagation time", f"{ratio(seconds, 'dilation', 'propagation'):.2f}x"),
        ("RATIO host scipy / propagation time",
         f"{ratio(seconds, 'host scipy', 'propagation'):.2f}x"),
        ("components: propagation rounds per batch (median, max)",
         _median_max([propagation_rounds(m) for m, _ in inputs])),
        ("components: dilation steps per batch (median, max)",
         _median_max([_dilation_steps(m, s) for m, s in inputs])),
    ]
    return rows, same


def _median_max(values: Sequence[int]) -> str:
    return f"{median(values):g}, {max(values)}"


def measure_blocking(grid: tuple[int, int], images: int, patch_size: int, dim: int,
                     k_patches: int, gram_bias: float, device: torch.device, rounds: int,
                     seed: int, block_bytes: int | None = None
                     ) -> tuple[list[tuple[str, object]], bool]:
    """LOST's seed expansion on ``images`` large images of one ``grid``, one at a time: the
    whole ``(N, N)`` similarity (budget lifted) vs row blocks under ``block_bytes`` (default:
    the device's budget, at most a quarter of ``N x N`` floats so that a GPU's 1 GiB budget
    still blocks). Returns result rows and whether both paths gave the same bits (degrees,
    seeds, ``M``)."""
    rows_n, cols_n = grid
    n = rows_n * cols_n
    size = (rows_n * patch_size, cols_n * patch_size)
    generator = torch.Generator().manual_seed(seed)
    feats = [synthetic_features(grid, size, patch_size, dim, generator).unsqueeze(0).to(device)
             for _ in range(images)]
    budget = block_bytes or min(
        lost_module.CHUNK_BYTES.get(device.type, lost_module.CHUNK_BYTES["cuda"]), n * n)
    saved = dict(lost_module.CHUNK_BYTES)

    def expand(f: torch.Tensor, bytes_: int) -> tuple[torch.Tensor, ...]:
        lost_module.CHUNK_BYTES[device.type] = bytes_
        try:
            return lost_module._seed_expansions(f, gram_bias, k_patches)
        finally:
            lost_module.CHUNK_BYTES.clear()
            lost_module.CHUNK_BYTES.update(saved)

    lost_module.CHUNK_BYTES[device.type] = budget
    block_rows = lost_module._row_block(n, device)
    lost_module.CHUNK_BYTES.update(saved)
    paths = {"unblocked": lambda f: expand(f, 1 << 62), "blocked": lambda f: expand(f, budget)}
    seconds, outputs = interleaved(paths, feats, rounds, device)
    same = all(torch.equal(a, b) for blocked, unblocked in
               zip(outputs["blocked"], outputs["unblocked"], strict=True)
               for a, b in zip(blocked, unblocked, strict=True))
    peak = _peak_bytes(device, {name: (lambda f=fn: f(feats[0])) for name, fn in paths.items()})
    rows: list[tuple[str, object]] = [
        ("blocking: images x grid (N patches)", f"{images} x {rows_n}x{cols_n} ({n})"),
        ("blocking: row blocks",
         f"{-(-n // block_rows)} of {block_rows} rows (budget {budget / 2**20:.2f} MiB)"),
        ("blocking: largest similarity tensor",
         f"unblocked {n * n * 4 / 2**20:.1f} MiB, blocked {block_rows * n * 4 / 2**20:.1f} MiB"),
        ("blocking: same degrees, seeds, M bits", "yes" if same else "NO"),
    ]
    for name in paths:
        rows.append((f"blocking: {name} images/s", f"{images / median(seconds[name]):.2f}"))
    rows.append(("RATIO blocked / unblocked time", f"{ratio(seconds, 'blocked', 'unblocked'):.2f}x"))
    for name, value in peak.items():
        rows.append((f"blocking: {name} peak device memory", f"{value / 2**20:.1f} MiB"))
    return rows, same


def _peak_bytes(device: torch.device, runs: dict[str, Callable[[], Any]]) -> dict[str, int]:
    """Peak allocated device memory of each run, above what was held before it (CUDA only:
    the CPU allocator keeps no such count)."""
    if device.type != "cuda":
        return {}
    peaks = {}
    for name, run in runs.items():
        synchronize(device)
        held = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        synchronize(device)
        peaks[name] = torch.cuda.max_memory_allocated(device) - held
    return peaks


# --- profile -----------------------------------------------------------------------------------


def profile_stages(batches: Sequence[FeatureBatch], k_patches: int, gram_bias: float,
                   device: torch.device) -> dict[str, float]:
    """Seconds per stage of the batched semantics, timed stage by stage over all batches.

    The stages replay ``lost``'s operations unchunked (matmul + bias, degrees, sort, seed
    expansion gather/sum), then every connected-component path of ``COMPONENT_PATHS`` on the
    same masks; the dilation's steps and the propagation's rounds are reported too.
    """
    totals: dict[str, float] = defaultdict(float)
    steps, rounds = [], []
    for batch in batches:
        rows, cols = batch.grid
        n = rows * cols
        t, sim = timed(lambda b=batch: torch.matmul(b.feats, b.feats.transpose(1, 2)), device)
        totals["matmul"] += t
        t, sim = timed(lambda s=sim: s + gram_bias, device)
        totals["add_gram_bias"] += t
        t, deg = timed(lambda s=sim: _degrees(s), device)
        totals["degrees (>0, sum)"] += t
        t, order = timed(lambda d=deg: torch.sort(d, dim=1, stable=True).indices, device)
        totals["sort"] += t

        def expand(s=sim, o=order, count=n):
            index = torch.arange(s.shape[0], device=s.device)
            potentials = o[:, :k_patches]
            similar = torch.gather(s[index, o[:, 0]], 1, potentials) > 0
            gathered = torch.gather(s, 1, potentials.unsqueeze(-1).expand(-1, -1, count))
            return (gathered.double() * similar.unsqueeze(-1)).sum(dim=1)

        t, summed = timed(expand, device)
        totals["seed expansion (gather, f64 sum)"] += t
        seed = order[:, 0]
        seed_rc = torch.stack([seed // cols, seed % cols], dim=1)
        mask = (summed > 0).view(-1, rows, cols)
        for name, fn in COMPONENT_PATHS.items():
            t, component = timed(lambda f=fn, m=mask, s=seed_rc: f(m, s), device)
            totals[f"connected component ({name})"] += t
        t, _ = timed(lambda c=component, s=seed_rc: geometry._component_boxes(c, s), device)
        totals["component boxes"] += t
        steps.append(_dilation_steps(mask, seed_rc))
        rounds.append(propagation_rounds(mask))
    totals["dilation steps (max per batch, median)"] = median(steps) if steps else 0.0
    totals["propagation rounds (per batch, median)"] = median(rounds) if rounds else 0.0
    return dict(totals)


def _degrees(similarity: torch.Tensor) -> torch.Tensor:
    """LOST's degree: other patches with positive similarity (diagonal excluded)."""
    positive = similarity > 0
    return positive.sum(dim=-1) - torch.diagonal(positive, dim1=-2, dim2=-1).long()


def _dilation_steps(mask: torch.Tensor, seed_rc: torch.Tensor) -> int:
    """Dilations until the slowest image's component stops growing (before the exit check)."""
    component = torch.zeros_like(mask)
    component[torch.arange(mask.shape[0]), seed_rc[:, 0], seed_rc[:, 1]] = True
    component &= mask
    steps = 0
    while True:
        grown = component.clone()
        grown[:, 1:] |= component[:, :-1]
        grown[:, :-1] |= component[:, 1:]
        grown[:, :, 1:] |= component[:, :, :-1]
        grown[:, :, :-1] |= component[:, :, 1:]
        grown &= mask
        if torch.equal(grown, component):
            return steps
        component, steps = grown, steps + 1


def profile_reference(batches: Sequence[FeatureBatch], k_patches: int, gram_bias: float,
                      device: torch.device, limit: int = 64) -> dict[str, float]:
    """Seconds per stage of ``lost_reference``'s steps on the first ``limit`` images."""
    totals: dict[str, float] = defaultdict(float)
    seen = 0
    for batch in batches:
        for i in range(len(batch.positions)):
            if seen >= limit:
                return dict(totals, images=seen)
            feats = batch.feats[i]
            t, sim = timed(lambda f=feats: f @ f.T + gram_bias, device)
            totals["matmul + bias"] += t

            def degrees(s=sim):
                scoring = s.clone()
                scoring.fill_diagonal_(0)
                return (scoring > 0).sum(dim=1)

            t, deg = timed(degrees, device)
            totals["degrees (clone, >0, sum)"] += t
            t, order = timed(lambda d=deg: torch.sort(d, stable=True).indices, device)
            totals["sort"] += t
            seed = int(order[0])

            def expand(s=sim, o=order, sd=seed):
                potentials = o[:k_patches]
                similars = potentials[s[sd, potentials] > 0]
                return s[similars, :].double().sum(dim=0)

            t, summed = timed(expand, device)
            totals["seed expansion (index, f64 sum)"] += t
            rows, cols = batch.grid
            t, _ = timed(lambda m=summed, r=rows, c=cols: scipy.ndimage.label(
                m.reshape(r, c).cpu().numpy() > 0), device)
            totals["host copy + scipy label"] += t
            seen += 1
    return dict(totals, images=seen)


# --- measurement -------------------------------------------------------------------------------


def measure(batches: Sequence[FeatureBatch], patch_size: int, k_patches: int, gram_bias: float,
            device: torch.device, paths: Sequence[str], rounds: int) -> dict:
    """Time every path on every batch, batch by batch, ``rounds`` times.

    Paths take turns on each batch (their order rotating) rather than each timing a whole
    pass: on a shared, noisy machine, load then hits all paths alike and the per-round
    ratios stay meaningful. Returns the last round's predictions and per-round seconds.
    """
    n_images = sum(len(b.positions) for b in batches)
    for name in paths:  # first calls pay for lazy init (thread pools, kernels, cuBLAS)
        PATHS[name](batches[:1], patch_size, k_patches, gram_bias)
    synchronize(device)
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    predictions: dict[str, dict[int, Prediction]] = {name: {} for name in paths}
    turn = 0
    for _ in range(rounds):
        spent = dict.fromkeys(paths, 0.0)
        for batch in batches:
            turn += 1
            for name in paths[turn % len(paths):] + paths[:turn % len(paths)]:
                elapsed, preds = timed(
                    lambda n=name, b=batch: PATHS[n]([b], patch_size, k_patches, gram_bias),
                    device)
                spent[name] += elapsed
                predictions[name].update(preds)
        for name in paths:
            seconds[name].append(spent[name])
    return {"n_images": n_images, "seconds": seconds, "predictions": predictions}


def grid_arg(text: str) -> tuple[int, int]:
    """``ROWSxCOLS`` of a patch grid, both at least 1."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected ROWSxCOLS, e.g. 48x64")
    return int(parts[0]), int(parts[1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=int, default=240, help="generated images")
    parser.add_argument("--dim", type=int, default=384, help="feature size d (ViT-S: 384)")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--size-scale", type=float, default=1.0,
                        help="scale of the VOC-like image sizes")
    parser.add_argument("--batch-size", type=int, default=32, help="max images per batch")
    parser.add_argument("--k-patches", type=int, default=100)
    parser.add_argument("--gram-bias", type=float, default=0.0)
    parser.add_argument("--features", choices=("structured", "noise"), default="structured")
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--paths", default="batched,reference,literal,gram_only",
                        help=f"comma-separated subset of {', '.join(PATHS)} (reference is "
                             "always run: it is the yardstick)")
    parser.add_argument("--large-grid", type=grid_arg, default=(48, 64),
                        help="ROWSxCOLS of the large images of the blocked vs unblocked "
                             "comparison (48x64 = 3072 patches, 36 MiB of similarities)")
    parser.add_argument("--large-images", type=int, default=2,
                        help="large images for the blocked vs unblocked comparison (0: skip)")
    parser.add_argument("--block-bytes", type=int, default=None,
                        help="byte budget of the blocked path in that comparison (default: "
                             "the device's CHUNK_BYTES, at most a quarter of N x N floats)")
    parser.add_argument("--profile", action="store_true",
                        help="also print where the time goes, stage by stage")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's). 1 makes CPU figures "
                             "stable on a shared machine: with 2+ threads every small op waits "
                             "for a descheduled thread when other processes load the cores")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    return parser


def checked_paths(args: argparse.Namespace, device: torch.device) -> list[str]:
    """The paths to time (the reference always among them); bad options as one line."""
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise LostregError(f"--paths: unknown {', '.join(unknown)}; known: {', '.join(PATHS)}")
    if "reference" not in paths:
        paths.append("reference")
    if args.rounds < 1:
        raise LostregError("--rounds must be at least 1")
    if args.large_images < 0:
        raise LostregError(f"--large-images {args.large_images}: must be 0 or more")
    if args.block_bytes is not None and args.block_bytes < 1:
        raise LostregError(f"--block-bytes {args.block_bytes}: must be at least 1")
    if device.type != "cpu" and {"bf16_filter", "gram_bf16"} & set(paths):
        # its error bound assumes float32 accumulation, which cuBLAS does not promise
        # for bf16 (reduced-precision reductions are allowed by default)
        raise LostregError("--paths bf16_filter/gram_bf16: CPU only (a tried CPU idea)")
    if args.threads is not None and args.threads < 1:
        raise LostregError(f"--threads {args.threads}: must be at least 1")
    return paths


def _ratios_to(base: str, seconds: dict[str, list[float]]) -> dict[str, float]:
    """Median over rounds of ``base``'s seconds / each path's (empty without ``base``)."""
    if base not in seconds:
        return {}
    return {name: median([r / s for r, s in zip(seconds[base], secs, strict=True)])
            for name, secs in seconds.items()}


def headline_rows(args: argparse.Namespace, batches: list, paths: list[str],
                  result: dict[str, Any], counts: dict[str, dict[str, int]],
                  ratios: dict[str, float]) -> list[tuple[str, object]]:
    """The first result block: the input, agreement, images/s and speedups of each path."""
    n, seconds = result["n_images"], result["seconds"]
    literal_ratios = _ratios_to("literal", seconds)
    grids = sorted({b.grid for b in batches}, key=lambda g: -sum(
        len(b.positions) for b in batches if b.grid == g))
    rows: list[tuple[str, object]] = [
        ("images", n),
        ("batches", len(batches)),
        ("grids (most common first)", ", ".join(f"{r}x{c}" for r, c in grids[:6])),
        ("features", f"{args.features}, d={args.dim}, patch {args.patch_size}"),
        ("k_patches / gram_bias", f"{args.k_patches} / {args.gram_bias}"),
        ("rounds (interleaved) / torch threads", f"{args.rounds} / {torch.get_num_threads()}"),
    ]
    for name, c in counts.items():
        rows.append((f"{name}: same box+seed as reference",
                     f"{c['same_both']}/{c['images']} (box {c['same_box']}, "
                     f"seed {c['same_seed']})"))
    for name in paths:
        per_round = ", ".join(f"{n / t:.0f}" for t in seconds[name])
        rows.append((f"{name}: images/s", f"{n / median(seconds[name]):.1f} "
                     f"(rounds: {per_round})"))
    rows += [(f"SPEEDUP {name} vs reference", f"{ratios[name]:.2f}x") for name in paths
             if name != "reference" and name not in FLOORS]
    rows += [(f"SPEEDUP {name} vs literal", f"{literal_ratios[name]:.2f}x") for name in paths
             if literal_ratios and name not in ("reference", "literal", *FLOORS)]
    if "gram_only" in paths:
        rows.append(("CEILING reference vs gram_only",
                     f"{ratios['gram_only']:.2f}x (no exact LOST can beat F F^T alone)"))
    if "gram_bf16" in paths:
        rows.append(("CEILING reference vs gram_bf16",
                     f"{ratios['gram_bf16']:.2f}x (bf16_filter if no row needed an exact "
                     "recompute)"))
    if "bf16_filter" in paths:
        shares = sorted(candidate_share(batches, args.patch_size, args.k_patches,
                                        args.gram_bias))
        rows.append(("bf16_filter: rows recomputed exactly",
                     f"median {median(shares):.1%}, min {shares[0]:.1%}, max {shares[-1]:.1%}"))
    goal = 10.0  # on a GPU the batched path should be far above it
    rows.append(("goal (batched vs reference)",
                 f">= {goal:.0f}x: {'MET' if ratios['batched'] >= goal else 'NOT MET'}"
                 if "batched" in ratios else "n/a (batched not run)"))
    return rows


def stage_rows_of(args: argparse.Namespace, batches: list,
                  device: torch.device) -> tuple[list[tuple[str, object]], bool]:
    """The second block: the component paths and, with ``--large-images``, row blocks."""
    rows, same = measure_components(batches, args.k_patches, args.gram_bias, device,
                                    args.rounds)
    if args.large_images:
        block_rows, blocks_same = measure_blocking(
            args.large_grid, args.large_images, args.patch_size, args.dim, args.k_patches,
            args.gram_bias, device, args.rounds, args.seed, args.block_bytes)
        rows += block_rows
        same = same and blocks_same
    return rows, same


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
        paths = checked_paths(args, device)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        sizes = sample_sizes(args.images, args.seed, args.size_scale)
        batches = make_batches(sizes, args.patch_size, args.dim, args.batch_size, device,
                               args.seed, args.features)
    except LostregError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = measure(batches, args.patch_size, args.k_patches, args.gram_bias, device, paths,
                     args.rounds)
    counts = agreement(result["predictions"])
    ratios = _ratios_to("reference", result["seconds"])
    facts = machine_facts(device)
    print(result_block("bench_lost: LOST stage, batched vs per-image loop",
                       headline_rows(args, batches, paths, result, counts, ratios)
                       + facts_rows(facts)))
    payload = {"benchmark": "bench_lost", "args": vars(args) | {"json": str(args.json)},
               "images_per_second": {name: result["n_images"] / median(secs)
                                     for name, secs in result["seconds"].items()},
               "speedup_vs_reference": ratios,
               "speedup_vs_literal": _ratios_to("literal", result["seconds"]),
               "agreement": counts, "seconds": result["seconds"], "machine": facts}
    stage_rows, stages_same = stage_rows_of(args, batches, device)
    print(result_block("stages: connected components (same masks), row-blocked similarities",
                       stage_rows))
    payload["stages"] = dict(stage_rows)
    if args.profile:
        stages = profile_stages(batches, args.k_patches, args.gram_bias, device)
        ref_stages = profile_reference(batches, args.k_patches, args.gram_bias, device)
        print(result_block("profile: batched lost, seconds per stage (all images)",
                           [(k, f"{v:.3f}") for k, v in stages.items()]))
        print(result_block(f"profile: lost_reference, seconds per stage "
                           f"(first {int(ref_stages.get('images', 0))} images)",
                           [(k, f"{v:.3f}") for k, v in ref_stages.items() if k != "images"]))
        payload["profile"] = {"batched": stages, "reference": ref_stages}
    save_json(args.json, payload)
    mismatched = [name for name in ("batched", "bf16_filter") if name in paths
                  and counts[name]["same_both"] != counts[name]["images"]]
    if mismatched:  # a speedup of a path that changes results is no speedup
        print(f"error: {', '.join(mismatched)} differ from lost_reference on some images",
              file=sys.stderr)
        return 1
    if not stages_same:
        print("error: the component paths or the blocked and unblocked similarities differ",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
