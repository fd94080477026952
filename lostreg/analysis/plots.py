"""Matplotlib figures of the analyses (Agg backend: files only, no display needed)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from lostreg.io import atomic_write_bytes  # noqa: E402


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> None:
    """Render ``fig`` to PNG bytes and write them atomically, then free the figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def log_bins(values: np.ndarray, count: int = 120) -> np.ndarray:
    """Log-spaced bin edges covering the positive ``values``."""
    positive = values[np.isfinite(values) & (values > 0)]
    low, high = (float(positive.min()), float(positive.max())) if positive.size else (1.0, 10.0)
    if not high > low:
        low, high = low / 1.1, high * 1.1
    return np.logspace(np.log10(low), np.log10(high), count + 1)


def norm_histogram(path: str | Path, norms: np.ndarray, threshold: float | None,
                   title: str, note: str | None = None) -> None:
    """Histogram of token norms on a log x-axis (linear and log counts), threshold marked."""
    values = np.asarray(norms, dtype=np.float64)
    bins = log_bins(values)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, log_y in zip(axes, (False, True), strict=True):
        ax.hist(values, bins=bins, color="#4477aa")
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("token L2 norm (log scale)")
        ax.set_ylabel("tokens" + (" (log scale)" if log_y else ""))
        if threshold is not None:
            share = float((values > threshold).mean()) if values.size else 0.0
            ax.axvline(threshold, color="#cc3311", linestyle="--",
                       label=f"threshold {threshold:.3g} ({share:.2%} outliers)")
            ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def similarity_histogram(path: str | Path, outlier_sims: np.ndarray, normal_sims: np.ndarray,
                         title: str) -> None:
    """Neighbour similarity of outlier vs normal tokens (density-normalised histograms)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(-1, 1, 81)
    for values, label, colour in ((normal_sims, "normal tokens", "#4477aa"),
                                  (outlier_sims, "outlier tokens", "#cc3311")):
        values = values[np.isfinite(values)]
        if values.size:
            ax.hist(values, bins=bins, density=True, alpha=0.6, color=colour,
                    label=f"{label} (mean {values.mean():.3f}, n={values.size})")
    ax.set_xlabel("mean cosine similarity to the 4 neighbours (input patch embedding)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
