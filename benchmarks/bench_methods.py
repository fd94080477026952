"""Discovery methods alone: each method's batched path vs its per-image reference, on identical
generated features, in one run.

For every method of ``--methods`` (lost, tokencut, dinoseg) the registry entry's ``run`` (one
call per batch of one grid, as ``lostreg.run`` calls it) and ``reference`` (image by image)
get the same tensors: VOC-like image sizes with patch 14 (ViT-S/14 on 500x375 -> a 27x36
grid), planted-object keys of ``--dim`` 384 for LOST and TokenCut, and class-token attention
maps of ``--heads`` 6 with a planted bright region for DINO-seg. Paths take turns batch by
batch, so load on a shared machine hits them alike.

Boxes (and seeds, where a method has them) must be identical. TokenCut's eigenvector is only
defined up to solver accuracy, so its mismatches are split into robust ones (a failure: the
reference's answer is well defined, see ``tokencut.reference_robustness``) and non-robust
ones (near-degenerate eigenvalues or an entry of ``v`` at its mean), which are counted and
printed. The script exits 1 on any failure.

    python benchmarks/bench_methods.py                           # CPU, ~3 min on 2 cores
    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_methods.py --threads 1   # stable CPU figures
    python benchmarks/bench_methods.py --device cuda --images 512 --batch-size 64
    python benchmarks/bench_methods.py --methods tokencut --solver squaring --profile
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import scipy.ndimage
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a file: make the ``benchmarks`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_lost import FeatureBatch, make_batches  # noqa: E402
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
    warm_up,
)
from lostreg.errors import LostregError  # noqa: E402
from lostreg.methods import MethodOutput, get_method  # noqa: E402
from lostreg.methods import dinoseg as dinoseg_module  # noqa: E402
from lostreg.methods import tokencut as tokencut_module  # noqa: E402
from lostreg.methods.geometry import seed_components  # noqa: E402

METHODS = ("lost", "tokencut", "dinoseg")
GOALS = {"tokencut": 20.0}  # batched vs reference, on a GPU (issue 10)
Prediction = tuple[tuple[int, ...], int]  # (box, seed); seed -1 for DINO-seg


# --- generated inputs --------------------------------------------------------------------------


def synthetic_attention(grid: tuple[int, int], image_size: tuple[int, int], patch_size: int,
                        heads: int, generator: torch.Generator) -> torch.Tensor:
    """Class-token attention ``(N, heads)`` for one image: smooth noise, a planted bright
    rectangle (a few blobs after thresholding), padding patches dimmer; rows sum below 1 as
    the class token and registers keep some mass."""
    rows, cols = grid
    height, width = image_size
    valid_r, valid_c = -(-height // patch_size), -(-width // patch_size)
    logits = torch.randn(heads, 1, rows, cols, generator=generator)
    logits = F.avg_pool2d(logits, 3, stride=1, padding=1, count_include_pad=False) * 2.5
    r0 = int(torch.randint(0, max(1, valid_r // 2), (1,), generator=generator))
    c0 = int(torch.randint(0, max(1, valid_c // 2), (1,), generator=generator))
    logits[:, :, r0:r0 + max(1, valid_r // 3), c0:c0 + max(1, valid_c // 3)] += 2.0
    logits[:, :, valid_r:] -= 2.0
    logits[:, :, :, valid_c:] -= 2.0
    return (0.9 * logits.flatten(1).softmax(dim=1)).T.contiguous()


def attention_batches(batches: Sequence[FeatureBatch], patch_size: int, heads: int,
                      device: torch.device, seed: int) -> list[FeatureBatch]:
    """The same images, grids and batches as ``batches``, with attention maps instead."""
    generator = torch.Generator().manual_seed(seed + 1)
    out = []
    for batch in batches:
        maps = [synthetic_attention(batch.grid, size, patch_size, heads, generator)
                for size in batch.sizes]
        out.append(FeatureBatch(batch.positions, batch.grid, batch.sizes,
                                torch.stack(maps).to(device)))
    return out


# --- the paths -------------------------------------------------------------------------------------


def run_batched(method: str, batch: FeatureBatch, patch_size: int, params: dict,
                solver: str | None) -> dict[int, Prediction]:
    """One ``run`` call for the batch; boxes come back to the host as ``lostreg.run`` needs."""
    sizes = torch.tensor(batch.sizes, device=batch.feats.device)
    if method == "tokencut" and solver is not None:
        out = tokencut_module.tokencut(batch.feats, batch.grid, patch_size, sizes, params["tau"],
                                       params["eps"], params["binary_graph"], solver)
    else:
        out = get_method(method).run(batch.feats, batch.grid, patch_size, sizes, params)
    boxes, seeds = out.box.cpu().tolist(), out.seed.cpu().tolist()
    return {position: (tuple(box), int(seed))
            for position, box, seed in zip(batch.positions, boxes, seeds, strict=True)}


def run_reference(method: str, batch: FeatureBatch, patch_size: int,
                  params: dict) -> dict[int, Prediction]:
    """``reference`` image by image over the same tensors."""
    spec = get_method(method)
    out = {}
    for i, position in enumerate(batch.positions):
        result: MethodOutput = spec.reference(batch.feats[i], batch.grid, patch_size,
                                              batch.sizes[i], params)
        out[position] = (tuple(int(v) for v in result.box.tolist()), int(result.seed))
    return out


def measure(method: str, batches: Sequence[FeatureBatch], patch_size: int, params: dict,
            solver: str | None, device: torch.device, rounds: int) -> dict[str, Any]:
    """Seconds per round of each path (taking turns batch by batch) and their predictions."""
    paths: dict[str, Callable[[FeatureBatch], dict[int, Prediction]]] = {
        "batched": lambda b: run_batched(method, b, patch_size, params, solver),
        "reference": lambda b: run_reference(method, b, patch_size, params),
    }
    for fn in paths.values():  # first calls pay for lazy init (thread pools, kernels, cuBLAS)
        fn(FeatureBatch(batches[0].positions[:1], batches[0].grid, batches[0].sizes[:1],
                        batches[0].feats[:1]))
    synchronize(device)
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    predictions: dict[str, dict[int, Prediction]] = {name: {} for name in paths}
    names = list(paths)
    for round_index in range(rounds):
        spent = dict.fromkeys(names, 0.0)
        for turn, batch in enumerate(batches):
            shift = (turn + round_index) % len(names)
            for name in names[shift:] + names[:shift]:
                elapsed, preds = timed(lambda n=name, b=batch: paths[n](b), device)
                spent[name] += elapsed
                predictions[name].update(preds)
        for name in names:
            seconds[name].append(spent[name])
    return {"seconds": seconds, "predictions": predictions}


# --- agreement -------------------------------------------------------------------------------------


def agreement(method: str, batches: Sequence[FeatureBatch], predictions: dict[str, dict],
              params: dict) -> dict[str, Any]:
    """Images whose box and seed match the reference; TokenCut's mismatches split by whether
    the reference's answer is robust (a robust mismatch is a failure)."""
    batched, reference = predictions["batched"], predictions["reference"]
    where = {p: (b, i) for b in batches for i, p in enumerate(b.positions)}
    box_diff = [p for p in reference if batched[p][0] != reference[p][0]]
    seed_diff = [p for p in reference if batched[p][1] != reference[p][1]]
    counts: dict[str, Any] = {"images": len(reference),
                              "same_box": len(reference) - len(box_diff),
                              "same_seed": len(reference) - len(seed_diff)}
    if method != "tokencut":
        counts["failures"] = len(set(box_diff) | set(seed_diff))
        return counts
    robust_box = robust_seed = 0
    for position in sorted(set(box_diff) | set(seed_diff)):
        batch, i = where[position]
        feats = batch.feats[i].cpu()
        if feats.shape[0] < 3:
            continue
        boxed = get_method("tokencut").reference(feats, batch.grid, 1, (1 << 20, 1 << 20),
                                                 params).mask
        box_ok, seed_ok = tokencut_module.reference_robustness(
            feats, boxed, params["tau"], params["eps"], params["binary_graph"])
        robust_box += box_ok and position in box_diff
        robust_seed += seed_ok and position in seed_diff
    counts.update(robust_box_mismatches=robust_box, robust_seed_mismatches=robust_seed,
                  nonrobust_mismatches=len(set(box_diff) | set(seed_diff)) - robust_box,
                  failures=robust_box + robust_seed)
    return counts


# --- profile (where the time goes) --------------------------------------------------------------


def profile_tokencut(batches: Sequence[FeatureBatch], patch_size: int, params: dict,
                     solver: str, device: torch.device, limit: int) -> dict[str, dict]:
    """Seconds per stage of the batched path (all batches) and of the reference (first
    ``limit`` images): similarity, graph, eigen-solve, cut + labelling + box."""
    tau, eps, binary = params["tau"], params["eps"], params["binary_graph"]
    batched: dict[str, float] = defaultdict(float)
    solver_stats: dict[str, Any] = {}
    flops = 0.0
    for batch in batches:
        rows, cols = batch.grid
        t, unit = timed(lambda b=batch: F.normalize(b.feats, p=2, dim=-1), device)
        t2, sim = timed(lambda u=unit: torch.bmm(u, u.transpose(1, 2)), device)
        batched["similarity (normalise + bmm)"] += t + t2
        t, weights = timed(lambda b=batch: tokencut_module.tokencut_weights(b.feats, tau, eps,
                                                                            binary), device)
        batched["graph (weights, incl. similarity again)"] += t
        before = sum(solver_stats.get("squarings", []))
        t, vectors = timed(lambda w=weights: tokencut_module.fiedler_vectors(w, solver,
                                                                             solver_stats),
                           device)
        flops += 2.0 * (rows * cols) ** 3 * (sum(solver_stats.get("squarings", [])) - before)
        batched[f"eigen-solve ({solver}, incl. D^-1/2 W D^-1/2)"] += t

        def cut(v=vectors, b=batch, r=rows, c=cols):
            seed, part = tokencut_module.bipartition(v)
            sizes = torch.tensor(b.sizes, device=v.device)
            return seed_components(part.view(-1, r, c), seed, patch_size, sizes)

        t, _ = timed(cut, device)
        batched["cut + labelling + box"] += t
    reference: dict[str, float] = defaultdict(float)
    seen = 0
    for batch in batches:
        for i in range(len(batch.positions)):
            if seen >= limit:
                break
            feats = batch.feats[i]
            t, pair = timed(lambda f=feats: _reference_graph(f, tau, eps, binary), device)
            reference["similarity + graph (numpy)"] += t
            t, vector = timed(lambda g=pair: scipy.linalg.eigh(g[0], g[1],
                                                               subset_by_index=[1, 2])[1][:, 0],
                              device)
            reference["scipy.linalg.eigh (generalised, subset)"] += t
            t, _ = timed(lambda v=vector, b=batch: _reference_cut(v, b.grid), device)
            reference["cut + scipy label + box"] += t
            seen += 1
    reference["images"] = seen
    if solver == "squaring":
        squarings = solver_stats.get("squarings", [])
        batched["squarings per image (median / max)"] = (
            f"{median(squarings):.0f} / {max(squarings)}" if squarings else "-")
        batched["dense fallbacks (images)"] = solver_stats.get("fallbacks", 0)
        batched["squaring float64 GFLOP per image"] = flops / 1e9 / max(1, len(squarings))
    return {"batched": dict(batched), "reference": dict(reference)}


def _reference_graph(feats: torch.Tensor, tau: float, eps: float,
                     binary: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(D - W, D)`` as the reference builds them (the profile's first stage)."""
    unit = F.normalize(feats.float(), p=2)
    similarity = (unit @ unit.T).cpu().numpy()
    if binary:
        weights = np.where(similarity > tau, 1.0, eps)
    else:
        weights = np.where(similarity < tau, np.float32(eps), similarity)
    degrees = np.diag(weights.sum(axis=1))
    return degrees - weights, degrees


def _reference_cut(vector: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    part = vector > vector.mean()
    seed = int(np.argmax(np.abs(vector)))
    if not part[seed]:
        part = ~part
    labels, _ = scipy.ndimage.label(part.reshape(grid))
    return np.nonzero(labels == labels[np.unravel_index(seed, grid)])


def profile_dinoseg(batches: Sequence[FeatureBatch], params: dict,
                    device: torch.device) -> dict[str, float]:
    """Seconds per stage of batched DINO-seg: threshold, labelling, selection + box."""
    head, mass, variant = params["dinoseg_head"], params["dinoseg_mass"], params["dinoseg_variant"]
    stages: dict[str, float] = defaultdict(float)
    for batch in batches:
        rows, cols = batch.grid
        t, kept = timed(lambda b=batch: dinoseg_module.kept_patches(b.feats, head, mass), device)
        stages["threshold (sort, cumsum, scatter)"] += t
        t, roots = timed(lambda k=kept, r=rows, c=cols: dinoseg_module.component_roots(
            k.view(-1, r, c)), device)
        stages["labelling"] += t
        t, _ = timed(lambda k=kept, ro=roots, shape=(-1, rows, cols): dinoseg_module
                     .mask_grid_boxes(dinoseg_module.select_component(k, ro, variant)
                                      .view(shape)), device)
        stages["selection + box"] += t
    return dict(stages)


# --- command line ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--images", type=int, default=32, help="generated images")
    parser.add_argument("--dim", type=int, default=384, help="feature size d (ViT-S: 384)")
    parser.add_argument("--heads", type=int, default=6, help="attention heads (ViT-S: 6)")
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--size-scale", type=float, default=1.0,
                        help="scale of the VOC-like image sizes")
    parser.add_argument("--batch-size", type=int, default=32, help="max images per batch")
    parser.add_argument("--solver", choices=("auto", *tokencut_module.SOLVERS), default="auto",
                        help="TokenCut's batched eigen-solver (auto: dense on CPU, squaring "
                             "on GPU)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, "
                                                         "cuda[:N]")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved timing rounds")
    parser.add_argument("--profile", action="store_true",
                        help="also print where TokenCut's and DINO-seg's time goes")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 gives stable CPU "
                             "figures on a shared machine. scipy's BLAS (TokenCut's reference "
                             "eigh) reads OPENBLAS_NUM_THREADS when it loads: set it too")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    return parser


def _setup(args: argparse.Namespace) -> tuple[torch.device, list[str]]:
    device = resolve_device(args.device)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise LostregError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; "
                           f"known: {', '.join(METHODS)}")
    if args.rounds < 1:
        raise LostregError("--rounds must be at least 1")
    if args.heads < 1 or args.dim < 1:
        raise LostregError("--heads and --dim must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise LostregError(f"--threads {args.threads}: must be at least 1")
        torch.set_num_threads(args.threads)
    return device, methods


def method_rows(method: str, result: dict, counts: dict, n: int,
                device: torch.device) -> list[tuple[str, object]]:
    seconds = result["seconds"]
    speed = {name: n / median(secs) for name, secs in seconds.items()}
    ratio = median([r / b for r, b in zip(seconds["reference"], seconds["batched"], strict=True)])
    rows: list[tuple[str, object]] = [
        (f"{method}: same box / seed as reference",
         f"{counts['same_box']}/{n} / {counts['same_seed']}/{n}"),
    ]
    if method == "tokencut":
        rows.append((f"{method}: mismatches robust (box, seed) / non-robust",
                     f"{counts['robust_box_mismatches']}, {counts['robust_seed_mismatches']} / "
                     f"{counts['nonrobust_mismatches']}"))
    rows += [
        (f"{method}: images/s batched", f"{speed['batched']:.2f}"),
        (f"{method}: images/s reference", f"{speed['reference']:.2f}"),
        (f"SPEEDUP {method} batched vs reference", f"{ratio:.2f}x"),
    ]
    if method in GOALS:
        goal = GOALS[method]
        verdict = ("MET" if ratio >= goal else "NOT MET") if device.type == "cuda" else \
            "n/a (the goal is for a GPU)"
        rows.append((f"goal {method} (GPU)", f">= {goal:.0f}x: {verdict}"))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device, methods = _setup(args)
        sizes = sample_sizes(args.images, args.seed, args.size_scale)
        feature_batches = make_batches(sizes, args.patch_size, args.dim, args.batch_size, device,
                                       args.seed)
    except LostregError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    warm_up(device)
    solver = None if args.solver == "auto" else args.solver
    grids = sorted({b.grid for b in feature_batches},
                   key=lambda g: -sum(len(b.positions) for b in feature_batches if g == b.grid))
    rows: list[tuple[str, object]] = [
        ("images / batches", f"{args.images} / {len(feature_batches)}"),
        ("grids (most common first)", ", ".join(f"{r}x{c}" for r, c in grids[:6])),
        ("features", f"planted-object keys d={args.dim}; attention {args.heads} heads; "
                     f"patch {args.patch_size}"),
        ("tokencut solver", solver or tokencut_module.default_solver(device)),
        ("rounds (interleaved) / torch threads", f"{args.rounds} / {torch.get_num_threads()}"),
        ("scipy BLAS threads (OPENBLAS_NUM_THREADS)",
         os.environ.get("OPENBLAS_NUM_THREADS", "unset: one per core")),
    ]
    payload: dict[str, Any] = {"benchmark": "bench_methods",
                               "args": vars(args) | {"json": str(args.json)}, "methods": {}}
    failures = 0
    for method in methods:
        params = get_method(method).resolve({})
        batches = (attention_batches(feature_batches, args.patch_size, args.heads, device,
                                     args.seed) if method == "dinoseg" else feature_batches)
        result = measure(method, batches, args.patch_size, params, solver, device, args.rounds)
        counts = agreement(method, batches, result["predictions"], params)
        failures += counts["failures"]
        rows += method_rows(method, result, counts, counts["images"], device)
        payload["methods"][method] = {"seconds": result["seconds"], "agreement": counts,
                                      "params": params}
    facts = machine_facts(device)
    print(result_block("bench_methods: batched vs per-image reference", rows + facts_rows(facts)))
    payload["machine"] = facts
    if args.profile:
        payload["profile"] = print_profiles(methods, feature_batches, args, solver, device)
    save_json(args.json, payload)
    if failures:  # a speedup of a path that changes results is no speedup
        print(f"error: {failures} robust mismatches between batched and reference paths",
              file=sys.stderr)
        return 1
    return 0


def print_profiles(methods: Sequence[str], feature_batches: Sequence[FeatureBatch],
                   args: argparse.Namespace, solver: str | None,
                   device: torch.device) -> dict[str, Any]:
    """Print (and return) where TokenCut's and DINO-seg's time goes."""
    profiles: dict[str, Any] = {}
    if "tokencut" in methods:
        params = get_method("tokencut").resolve({})
        stages = profile_tokencut(feature_batches, args.patch_size, params,
                                  solver or tokencut_module.default_solver(device), device,
                                  limit=8)
        print(result_block("profile: tokencut batched, seconds per stage (all images)",
                           [(k, f"{v:.3f}" if isinstance(v, float) else v)
                            for k, v in stages["batched"].items()]))
        print(result_block(f"profile: tokencut reference, seconds per stage (first "
                           f"{int(stages['reference'].pop('images'))} images)",
                           [(k, f"{v:.3f}") for k, v in stages["reference"].items()]))
        profiles["tokencut"] = stages
    if "dinoseg" in methods:
        params = get_method("dinoseg").resolve({})
        batches = attention_batches(feature_batches, args.patch_size, args.heads, device,
                                    args.seed)
        stages = profile_dinoseg(batches, params, device)
        print(result_block("profile: dinoseg batched, seconds per stage (all images)",
                           [(k, f"{v:.4f}") for k, v in stages.items()]))
        profiles["dinoseg"] = stages
    return profiles


if __name__ == "__main__":
    sys.exit(main())
