"""Token-norm statistics: pure functions on tensors and arrays, testable without a model.

Darcet et al. (ICLR 2024) find that large ViTs without registers repurpose a few patch tokens
in redundant background areas as global "scratch space": their output norm is ~10x the rest,
so the norm histogram on a log axis is bimodal. This module measures exactly that:

* :func:`patch_token_norms`: L2 norm of each patch token (class and register tokens dropped);
* :func:`split_threshold`: the automatic outlier threshold, a 2-component Gaussian mixture on
  log10 norms with guards so a unimodal distribution yields *no* threshold (see its docstring);
* :func:`outlier_mask`: norms above the threshold (no threshold: nothing is an outlier);
* :func:`neighbour_similarity`: each token's mean cosine similarity to its 4 grid neighbours in
  a feature map (used on the input patch embedding: artifacts sit where patches are redundant);
* :func:`touches_mask` / :func:`box_patch_slice`: where a LOST seed or box meets outliers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Guards of the automatic split (documented in split_threshold).
MIN_SEPARATION = 2.0
MAX_VALLEY_RATIO = 0.5
MAX_OUTLIER_WEIGHT = 0.5
HIST_BINS = 2048
EM_ITERATIONS = 300


def patch_token_norms(tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """L2 norms ``(B, N)`` of the patch tokens of ``tokens`` ``(B, T, D)`` (prefix dropped).

    Computed in float32 at least, so a bf16 forward does not round the norms twice.
    """
    patches = tokens[:, num_prefix_tokens:]
    if patches.dtype not in (torch.float32, torch.float64):
        patches = patches.float()
    return torch.linalg.vector_norm(patches, dim=-1)


def neighbour_similarity(grid_features: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of each grid cell to its existing 4-neighbours.

    ``grid_features`` is ``(R, C, D)`` or ``(B, R, C, D)``; returns ``(R, C)`` / ``(B, R, C)``
    float32. Border cells average over the 2 or 3 neighbours they have; a 1x1 grid has no
    neighbour and gives NaN (callers use nan-aware means).
    """
    unbatched = grid_features.ndim == 3
    feats = grid_features.unsqueeze(0) if unbatched else grid_features
    feats = F.normalize(feats.float(), dim=-1)
    batch, rows, cols, _ = feats.shape
    total = torch.zeros((batch, rows, cols), dtype=torch.float32, device=feats.device)
    count = torch.zeros((rows, cols), dtype=torch.float32, device=feats.device)
    if cols > 1:
        right = (feats[:, :, :-1] * feats[:, :, 1:]).sum(-1)
        total[:, :, :-1] += right
        total[:, :, 1:] += right
        count[:, :-1] += 1
        count[:, 1:] += 1
    if rows > 1:
        down = (feats[:, :-1] * feats[:, 1:]).sum(-1)
        total[:, :-1] += down
        total[:, 1:] += down
        count[:-1] += 1
        count[1:] += 1
    out = total / count  # 0/0 -> NaN for a lone cell
    return out[0] if unbatched else out


@dataclass(frozen=True)
class ThresholdSplit:
    """Result of :func:`split_threshold`; ``threshold`` is ``None`` when there is no clear split.

    Mixture parameters are in log10(norm) units; ``separation`` is Ashman's D
    ``sqrt(2)|mu_high - mu_low| / sqrt(sd_low^2 + sd_high^2)`` and ``valley_ratio`` the fitted
    density at the threshold divided by the density at the high mode's peak.
    """

    threshold: float | None
    bimodal: bool
    reason: str
    method: str = "gmm2-log10"
    n_values: int = 0
    low_mean: float | None = None
    low_std: float | None = None
    high_mean: float | None = None
    high_std: float | None = None
    high_weight: float | None = None
    separation: float | None = None
    valley_ratio: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def otsu_split(values: np.ndarray, bins: int = 256) -> float | None:
    """Otsu's threshold on a 1-D sample (maximises the between-class variance of a histogram).

    Used to initialise the mixture; ``None`` when all values are equal.
    """
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if not high > low:
        return None
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)[:-1].astype(np.float64)
    weight_high = counts.sum() - weight_low
    sum_low = np.cumsum(counts * centres)[:-1]
    sum_high = (counts * centres).sum() - sum_low
    valid = (weight_low > 0) & (weight_high > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = weight_low * weight_high * (sum_low / weight_low - sum_high / weight_high) ** 2
    between = np.where(valid, between, -1.0)
    return float(edges[int(np.argmax(between)) + 1])


def _log_gauss(x: np.ndarray, mean: float, var: float) -> np.ndarray:
    return -0.5 * ((x - mean) ** 2 / var + math.log(2 * math.pi * var))


def _fit_two_gaussians(x: np.ndarray, w: np.ndarray, init_split: float, var_floor: float):
    """Weighted EM for a 2-component 1-D Gaussian mixture on histogram centres ``x``."""
    low = x <= init_split
    params = []
    for side in (low, ~low):
        weight = w[side].sum()
        mean = float((w[side] * x[side]).sum() / weight)
        var = float((w[side] * (x[side] - mean) ** 2).sum() / weight) + var_floor
        params.append([weight / w.sum(), mean, var])
    previous = -np.inf
    for _ in range(EM_ITERATIONS):
        log_p = np.stack([math.log(max(p[0], 1e-300)) + _log_gauss(x, p[1], p[2])
                          for p in params])
        top = log_p.max(axis=0)
        log_total = top + np.log(np.exp(log_p - top).sum(axis=0))
        resp = np.exp(log_p - log_total)
        for k in range(2):
            r = resp[k] * w
            mass = r.sum()
            if mass <= 0:
                return None
            mean = float((r * x).sum() / mass)
            var = float((r * (x - mean) ** 2).sum() / mass) + var_floor
            params[k] = [mass / w.sum(), mean, var]
        likelihood = float((w * log_total).sum())
        if likelihood - previous < 1e-9 * abs(likelihood) + 1e-12:
            break
        previous = likelihood
    params.sort(key=lambda p: p[1])
    return params


def _mixture_density(x: np.ndarray, params) -> np.ndarray:
    return sum(p[0] * np.exp(_log_gauss(x, p[1], p[2])) for p in params)


def split_threshold(
    norms: np.ndarray,
    min_separation: float = MIN_SEPARATION,
    max_valley_ratio: float = MAX_VALLEY_RATIO,
    max_outlier_weight: float = MAX_OUTLIER_WEIGHT,
) -> ThresholdSplit:
    """Automatic outlier threshold on token norms, or ``None`` if they are not bimodal.

    Method: fit a 2-component Gaussian mixture to ``log10(norm)`` (EM on a fine histogram,
    initialised at Otsu's split). Otsu alone is not used because artifact tokens are a few
    percent of all tokens or less, and with classes that unbalanced Otsu's criterion cuts into
    the big mode (it does on a 0.5% mode 10x above the rest); a mixture models the small mode
    explicitly. The threshold is where the two
    weighted components are equally likely (the posterior-0.5 point between the two means).

    Guards, all required, so a model *without* artifacts gets no threshold at all:

    * the two modes are separated: Ashman's D >= ``min_separation`` (2: cleanly separated);
    * there is a real valley: the fitted density at the threshold is at most
      ``max_valley_ratio`` times the density at the high mode's peak (a shoulder or a long tail
      is not a second mode);
    * the high-norm component is a minority (weight <= ``max_outlier_weight``): artifacts are
      rare by construction.
    """
    values = np.asarray(norms, dtype=np.float64).ravel()
    values = values[np.isfinite(values) & (values > 0)]
    n = int(values.size)
    if n < 4:
        return ThresholdSplit(None, False, "fewer than 4 token norms", n_values=n)
    logs = np.log10(values)
    lo, hi = float(logs.min()), float(logs.max())
    if not hi - lo > 1e-9 * max(1.0, abs(hi)):
        return ThresholdSplit(None, False, "all norms are equal", n_values=n)
    counts, edges = np.histogram(logs, bins=HIST_BINS, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    keep = counts > 0
    x, w = centres[keep], counts[keep].astype(np.float64)
    width = edges[1] - edges[0]
    start = otsu_split(logs)
    params = _fit_two_gaussians(x, w, start if start is not None else (lo + hi) / 2,
                                var_floor=width * width / 12)
    if params is None:
        return ThresholdSplit(None, False, "mixture collapsed to one component", n_values=n)
    (w_lo, m_lo, v_lo), (w_hi, m_hi, v_hi) = params
    separation = math.sqrt(2) * (m_hi - m_lo) / math.sqrt(v_lo + v_hi)
    fields = dict(n_values=n, low_mean=m_lo, low_std=math.sqrt(v_lo), high_mean=m_hi,
                  high_std=math.sqrt(v_hi), high_weight=w_hi, separation=separation)
    grid = np.linspace(m_lo, m_hi, 4001)
    log_ratio = (math.log(w_hi) + _log_gauss(grid, m_hi, v_hi)
                 - math.log(w_lo) - _log_gauss(grid, m_lo, v_lo))
    crossings = np.nonzero((log_ratio[:-1] < 0) & (log_ratio[1:] >= 0))[0]
    if crossings.size == 0:
        return ThresholdSplit(None, False, "one component dominates between the modes",
                              **fields)
    density = _mixture_density(grid, params)
    i = int(crossings[np.argmin(density[crossings])])
    a, b = log_ratio[i], log_ratio[i + 1]
    log_threshold = float(grid[i] + (grid[i + 1] - grid[i]) * (-a / (b - a)))
    at_threshold = float(_mixture_density(np.array([log_threshold]), params)[0])
    upper = np.linspace(log_threshold, m_hi + 3 * math.sqrt(v_hi), 2001)
    high_peak = float(_mixture_density(upper, params).max())
    valley_ratio = at_threshold / high_peak if high_peak > 0 else math.inf
    fields["valley_ratio"] = valley_ratio
    threshold = 10.0 ** log_threshold
    if separation < min_separation:
        return ThresholdSplit(None, False, f"modes not separated (Ashman D {separation:.2f} < "
                              f"{min_separation})", **fields)
    if valley_ratio > max_valley_ratio:
        return ThresholdSplit(None, False, f"no valley between the modes (density ratio "
                              f"{valley_ratio:.2f} > {max_valley_ratio})", **fields)
    share = float((values > threshold).mean())
    if w_hi > max_outlier_weight or share > max_outlier_weight:
        return ThresholdSplit(None, False, f"high-norm mode holds {share:.0%} of tokens: not a "
                              "rare artifact mode", **fields)
    return ThresholdSplit(threshold, True, "bimodal", **fields)


def outlier_mask(norms: np.ndarray | torch.Tensor, threshold: float | None) -> np.ndarray:
    """Boolean mask of norms strictly above ``threshold``; all False when it is ``None``."""
    array = norms.detach().cpu().numpy() if isinstance(norms, torch.Tensor) else np.asarray(norms)
    if threshold is None:
        return np.zeros(array.shape, dtype=bool)
    return array.astype(np.float64) > threshold


def touches_mask(mask: np.ndarray, row: int, col: int) -> bool:
    """True when cell ``(row, col)`` of the 2-D ``mask`` or one of its 4-neighbours is set."""
    rows, cols = mask.shape
    for r, c in ((row, col), (row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1)):
        if 0 <= r < rows and 0 <= c < cols and mask[r, c]:
            return True
    return False


def box_patch_slice(box: list[float] | tuple[float, ...], patch_size: int,
                    grid: tuple[int, int]) -> tuple[slice, slice]:
    """Rows and columns of the patch grid that a pixel box ``[x1, y1, x2, y2]`` overlaps.

    A LOST box is a union of whole patches clipped to the image, so this gives back exactly
    the patches it was built from.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    rows, cols = grid
    r0 = min(max(int(math.floor(y1 / patch_size)), 0), rows)
    c0 = min(max(int(math.floor(x1 / patch_size)), 0), cols)
    r1 = min(max(int(math.ceil(y2 / patch_size)), r0), rows)
    c1 = min(max(int(math.ceil(x2 / patch_size)), c0), cols)
    return slice(r0, r1), slice(c0, c1)


def nan_mean(values: np.ndarray) -> float | None:
    """Mean of the finite entries, ``None`` when there are none (JSON-friendly)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None
