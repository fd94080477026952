"""Plain per-image transcriptions of the published saliency codes, used only by the tests.

Each function follows its source step by step, with the same libraries (torch for the
metrics, scipy.sparse for the solver) and the same dtypes, so that a test can hold
``lostreg.evaluation.saliency`` and ``lostreg.methods.bilateral`` to them. They are written
from reading the sources below (not copied), and are deliberately slow and literal:

* ``TokenCut``: ``YangtaoWANG95/TokenCut`` @ ``ce70ed6176b1876212f0a3d1144d28507c81427d``,
  ``unsupervised_saliency_detection/metric.py`` (IoU, accuracy, precision_recall, F_score,
  F_max, metrics) and ``bilateral_solver.py`` (BilateralGrid, bistochastize,
  BilateralSolver, bilateral_solver_output); GT read in ``get_saliency.py`` with
  ``Image.open(..).convert('L')``;
* ``MOVE``: ``adambielski/move-seg`` @ ``6ea886d0bec09e84f91f4d62a40340babb72a768``,
  ``segmentation_eval.py`` (IoU with ``union + 1e-8``, 256 thresholds, dataset-level and
  per-image max);
* ``FOUND``: ``valeoai/FOUND`` @ ``f9f2ef709002037c5498ce571115ad76b9627c31``,
  ``evaluation/metrics/f_measure.py`` / ``iou.py`` / ``pixel_acc.py`` (from SelfMask,
  ``NoelShin/selfmask`` @ ``d37cf79635a1afc2a053e2e31c5aceb7a6b38117``) and
  ``evaluation/saliency.py`` @ ``0ee8b562cd1472a44bc2739c7094c34c99aa19ba`` (``eval_batch``,
  ``AverageMeter``); GT ``== 255`` in ``datasets/datasets.py``.

The one deliberate departure: SciPy >= 1.14 no longer accepts ``cg(..., tol=)``, and its
``cg`` dropped the "legacy" absolute-tolerance exit that TokenCut's SciPy (>= 1.5 on Python 3.7,
so at most 1.7.x) applied when ``atol`` was not given. ``legacy_cg`` restores that exit in
front of today's ``cg(rtol=tol, atol=0)``; see ``lostreg.methods.bilateral`` for the proof that
the iterates are otherwise the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage
from scipy.sparse import csr_matrix, diags
from scipy.sparse.linalg import cg

# --- TokenCut metric.py -------------------------------------------------------------------


def tokencut_iou(mask1: torch.Tensor, mask2: torch.Tensor) -> float:
    mask1, mask2 = (mask1 > 0.5).to(torch.bool), (mask2 > 0.5).to(torch.bool)
    intersection = torch.sum(mask1 * (mask1 == mask2), dim=[-1, -2]).squeeze()
    union = torch.sum(mask1 + mask2, dim=[-1, -2]).squeeze()
    return (intersection.to(torch.float) / union).mean().item()


def tokencut_accuracy(mask1: torch.Tensor, mask2: torch.Tensor) -> float:
    mask1, mask2 = (mask1 > 0.5).to(torch.bool), (mask2 > 0.5).to(torch.bool)
    return torch.mean((mask1 == mask2).to(torch.float)).item()


def tokencut_precision_recall(mask_gt: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    mask_gt, mask = mask_gt.to(torch.bool), mask.to(torch.bool)
    true_positive = torch.sum(mask_gt * (mask_gt == mask), dim=[-1, -2]).squeeze()
    mask_area = torch.sum(mask, dim=[-1, -2]).to(torch.float)
    mask_gt_area = torch.sum(mask_gt, dim=[-1, -2]).to(torch.float)
    precision = true_positive / mask_area
    precision[mask_area == 0.0] = 1.0
    recall = true_positive / mask_gt_area
    recall[mask_gt_area == 0.0] = 1.0
    return precision.item(), recall.item()


def tokencut_f_score(p: torch.Tensor, r: torch.Tensor, betta_sq: float = 0.3) -> torch.Tensor:
    f_scores = ((1 + betta_sq) * p * r) / (betta_sq * p + r)
    f_scores[f_scores != f_scores] = 0.0
    return f_scores


def tokencut_metrics(preds: list[np.ndarray], gts: list[np.ndarray],
                     prob_bins: int = 255) -> dict[str, object]:
    """``metric.metrics(pred, gt)``: per-image IoU and accuracy summed in Python floats, the
    (images, thresholds) precision/recall tables, F averaged over images then maxed. Also
    returns the per-image tables so tests can compare them entry by entry."""
    sums = {"IoU": 0.0, "accuracy": 0.0}
    precisions, recalls, ious, accs = [], [], [], []
    for prediction_np, gt_np in zip(preds, gts, strict=True):
        prediction, mask = torch.from_numpy(prediction_np), torch.from_numpy(gt_np)
        iou = tokencut_iou(mask, prediction)
        acc = tokencut_accuracy(mask, prediction)
        sums["IoU"] += iou
        sums["accuracy"] += acc
        ious.append(iou)
        accs.append(acc)
        p, r = [], []
        for split in np.arange(0.0, 1.0, 1.0 / prob_bins):
            pr = tokencut_precision_recall(mask, prediction > split)
            p.append(pr[0])
            r.append(pr[1])
        precisions.append(p)
        recalls.append(r)
    f_table = tokencut_f_score(torch.tensor(precisions), torch.tensor(recalls))
    return {"IoU": sums["IoU"] / len(gts), "accuracy": sums["accuracy"] / len(gts),
            "F_max": f_table.mean(dim=0).max().item(), "f_table": f_table.numpy(),
            "ious": ious, "accs": accs}


# --- MOVE segmentation_eval.py ------------------------------------------------------------


def move_iou(mask1: torch.Tensor, mask2: torch.Tensor) -> float:
    mask1, mask2 = mask1.to(torch.bool), mask2.to(torch.bool)
    intersection = torch.sum(mask1 * (mask1 == mask2), dim=[-1, -2]).squeeze()
    union = torch.sum(mask1 + mask2, dim=[-1, -2]).squeeze()
    return (intersection.to(torch.float) / (union + 1e-8)).mean().item()


def move_accuracy(mask1: torch.Tensor, mask2: torch.Tensor) -> float:
    mask1, mask2 = mask1.to(torch.bool), mask2.to(torch.bool)
    return torch.mean((mask1 == mask2).to(torch.float)).item()


def move_f_max(precisions: torch.Tensor, recalls: torch.Tensor) -> tuple[float, int]:
    f = tokencut_f_score(precisions, recalls, 0.3).mean(dim=0)
    f_argmax = f.argmax().item()
    return f[f_argmax].item(), f_argmax


def move_metrics(preds: list[np.ndarray], gts_gray: list[np.ndarray], th: float = 0.5
                 ) -> dict[str, object]:
    """The ``--fbeta`` branch of ``segmentation_eval.py`` on in-memory float32 predictions
    (MOVE reads them from 8-bit PNGs and divides by 255; the metric code is what is copied
    here). GT: ``float32(gray) / 255 > 0.5``."""
    precisions, recalls, ious, accs = [], [], [], []
    for pred_np, gray in zip(preds, gts_gray, strict=True):
        gt_mask = torch.from_numpy(gray.astype(np.float32)) / 255
        gt_mask = (gt_mask > 0.5).float()
        pred_mask = torch.from_numpy(pred_np)
        p, r = [], []
        for split in np.arange(0.0, 1.0, 1.0 / 256):
            pr = tokencut_precision_recall(gt_mask, pred_mask > split)
            p.append(pr[0])
            r.append(pr[1])
        precisions.append(p)
        recalls.append(r)
        pred_mask = (pred_mask > th).float()
        ious.append(move_iou(gt_mask, pred_mask))
        accs.append(move_accuracy(gt_mask, pred_mask))
    f_beta_max, f_beta_argmax = move_f_max(torch.tensor(precisions), torch.tensor(recalls))
    per_image = [move_f_max(pr.unsqueeze(0), rc.unsqueeze(0))[0]
                 for pr, rc in zip(torch.tensor(precisions), torch.tensor(recalls), strict=True)]
    return {"iou": float(np.array(ious).mean()), "acc": float(np.array(accs).mean()),
            "f_max": f_beta_max, "f_argmax": f_beta_argmax,
            "f_max_per_image": torch.tensor(per_image).mean().item(), "ious": ious, "accs": accs}


# --- FOUND / SelfMask -------------------------------------------------------------------------


class FoundFMeasure:
    """``FMeasure`` of FOUND's ``evaluation/metrics/f_measure.py`` (SelfMask's, with
    ``all_f``): note ``beta_square ** 2``."""

    def __init__(self, default_thres: float = 0.5, beta_square: float = 0.3, n_bins: int = 255,
                 eps: float = 1e-7) -> None:
        self.beta_square, self.default_thres = beta_square, default_thres
        self.eps, self.n_bins = eps, n_bins

    def precision_recall(self, binary: torch.Tensor, gt: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        tp = torch.logical_and(binary, gt).sum(dim=(-1, -2))
        tp_fp = binary.sum(dim=(-1, -2))
        tp_fn = gt.sum(dim=(-1, -2))
        return tp / (tp_fp + self.eps), tp / (tp_fn + self.eps)

    def f_measure(self, pred: torch.Tensor, gt: torch.Tensor,
                  thresholds: torch.Tensor | None = None) -> torch.Tensor:
        binary = pred > self.default_thres if thresholds is None else pred > thresholds
        prec, recall = self.precision_recall(binary, gt)
        return ((1 + (self.beta_square ** 2)) * prec * recall) / (
            (self.beta_square ** 2) * prec + recall + self.eps)

    def __call__(self, pred: torch.Tensor, gt: torch.Tensor) -> dict[str, torch.Tensor]:
        preds = pred.unsqueeze(dim=0).repeat(self.n_bins, 1, 1)
        gts = gt.unsqueeze(dim=0).repeat(self.n_bins, 1, 1)
        thresholds = torch.arange(0, 1, 1 / self.n_bins).view(self.n_bins, 1, 1)
        all_f = self.f_measure(preds, gts, thresholds)
        return {"f_measure": self.f_measure(pred, gt), "f_max": torch.max(all_f), "all_f": all_f}


def found_iou(pred: torch.Tensor, gt: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    pred = pred > 0.5
    intersection = torch.logical_and(pred, gt).sum(dim=(-1, -2))
    union = torch.logical_or(pred, gt).sum(dim=(-1, -2))
    return intersection / (union + eps)


def found_pixel_accuracy(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    return ((pred > 0.5) == gt).to(torch.float32).mean(dim=(-1, -2))


def found_metrics(preds: list[np.ndarray], gts_gray: list[np.ndarray]) -> dict[str, object]:
    """``eval_batch`` image by image (FOUND evaluates full-size images with batch size 1):
    GT ``gray == 255`` as float, IoU/accuracy on ``pred > 0.5``, F on the prediction itself;
    averages as ``AverageMeter`` (here summed in float64); ``iou_last`` is what
    ``eval_batch`` returns as ``results["iou"]``."""
    ious, accs, f_maxs, f_measures, all_fs = [], [], [], [], []
    for pred_np, gray in zip(preds, gts_gray, strict=True):
        gt = torch.tensor(gray == 255).float()
        pred = torch.from_numpy(pred_np)
        binary_pred = (pred > 0.5).float()
        ious.append(float(found_iou(binary_pred, gt)))
        accs.append(float(found_pixel_accuracy(binary_pred, gt)))
        out = FoundFMeasure()(pred, gt)
        f_maxs.append(float(out["f_max"]))
        f_measures.append(float(out["f_measure"]))
        all_fs.append(out["all_f"].numpy().reshape(-1))
    return {"iou": float(np.mean(ious)), "iou_last": ious[-1], "acc": float(np.mean(accs)),
            "f_max": float(np.mean(f_maxs)), "f_measure": float(np.mean(f_measures)),
            "ious": ious, "accs": accs, "f_maxs": f_maxs, "all_f": np.stack(all_fs)}


# --- TokenCut bilateral_solver.py -------------------------------------------------------

RGB_TO_YUV = np.array([[0.299, 0.587, 0.114],
                       [-0.168736, -0.331264, 0.5],
                       [0.5, -0.418688, -0.081312]])
YUV_OFFSET = np.array([0, 128.0, 128.0]).reshape(1, 1, -1)
MAX_VAL = 255.0


def reference_colour_cells(im: np.ndarray, sigma_luma: float, sigma_chroma: float
                           ) -> tuple[np.ndarray, np.ndarray]:
    """``BilateralGrid.__init__``'s colour cells: luma ``(H, W)`` and chroma ``(H, W, 2)``."""
    im_yuv = np.tensordot(im, RGB_TO_YUV, ([2], [1])) + YUV_OFFSET
    luma_coords = (im_yuv[..., 0] / sigma_luma).astype(int)
    chroma_coords = (im_yuv[..., 1:] / sigma_chroma).astype(int)
    return luma_coords, chroma_coords


class ReferenceGrid:
    """``BilateralGrid``: float hashes of the (x, y, luma, u, v) cells, a splat matrix and one
    ``[1 0 1]`` blur matrix per dimension, found with ``searchsorted``."""

    def __init__(self, im: np.ndarray, sigma_spatial: float, sigma_luma: float,
                 sigma_chroma: float) -> None:
        iy, ix = np.mgrid[:im.shape[0], :im.shape[1]]
        x_coords = (ix / sigma_spatial).astype(int)
        y_coords = (iy / sigma_spatial).astype(int)
        luma_coords, chroma_coords = reference_colour_cells(im, sigma_luma, sigma_chroma)
        coords = np.dstack((x_coords, y_coords, luma_coords, chroma_coords))
        coords_flat = coords.reshape(-1, coords.shape[-1])
        self.npixels, self.dim = coords_flat.shape
        self.hash_vec = MAX_VAL ** np.arange(self.dim)
        hashed = np.dot(coords_flat.reshape(-1, self.dim), self.hash_vec)
        unique_hashes, unique_idx, idx = np.unique(hashed, return_index=True, return_inverse=True)
        unique_coords = coords_flat[unique_idx]
        self.nvertices = len(unique_coords)
        self.S = csr_matrix((np.ones(self.npixels), (idx, np.arange(self.npixels))))
        self.blurs = []
        for d in range(self.dim):
            blur = 0.0
            for offset in (-1, 1):
                offset_vec = np.zeros((1, self.dim))
                offset_vec[:, d] = offset
                neighbor_hash = np.dot((unique_coords + offset_vec).reshape(-1, self.dim),
                                       self.hash_vec)
                locs = np.clip(np.searchsorted(unique_hashes, neighbor_hash), 0,
                               len(unique_hashes) - 1)
                valid = np.flatnonzero(unique_hashes[locs] == neighbor_hash)
                blur = blur + csr_matrix((np.ones((len(valid),)), (valid, locs[valid])),
                                         shape=(self.nvertices, self.nvertices))
            self.blurs.append(blur)

    def splat(self, x: np.ndarray) -> np.ndarray:
        return self.S.dot(x)

    def slice(self, y: np.ndarray) -> np.ndarray:
        return self.S.T.dot(y)

    def blur(self, x: Any) -> Any:
        out = 2 * self.dim * x
        for blur in self.blurs:
            out = out + blur.dot(x)
        return out


def legacy_cg(a: csr_matrix, b: np.ndarray, x0: np.ndarray, m: Any, maxiter: int, tol: float
              ) -> tuple[np.ndarray, int]:
    """``cg(A, b, x0=x0, M=M, maxiter=maxiter, tol=tol)`` as SciPy 1.5-1.7 ran it (``atol``
    not given, so "legacy"): return ``x0`` when ``|b - A x0| <= tol`` (absolute), else stop
    once ``|r| <= tol |b|``."""
    if np.linalg.norm(a.dot(x0) - b) <= tol:
        return x0.copy(), 0
    return cg(a, b, x0=x0, M=m, maxiter=maxiter, rtol=tol, atol=0.0)


def reference_bilateral(image: np.ndarray, target: np.ndarray, sigma_spatial: float = 16,
                        sigma_luma: float = 16, sigma_chroma: float = 8
                        ) -> tuple[np.ndarray, np.ndarray]:
    """``bilateral_solver_output`` with the image given as an array (TokenCut opens the file
    with ``Image.open(path).convert('RGB')``): soft solver output and its post-processed
    binary mask (fill holes, then ``labeled == argsort(sizes)[-2]``, or all ones)."""
    h, w = target.shape
    confidence = np.ones((h, w)) * 0.999
    grid = ReferenceGrid(image, sigma_spatial, sigma_luma, sigma_chroma)
    # bistochastize(grid, maxiter=10)
    m = grid.splat(np.ones(grid.npixels))
    n = np.ones(grid.nvertices)
    for _ in range(10):
        n = np.sqrt(n * m / grid.blur(n))
    m = n * grid.blur(n)
    dm, dn = diags(m, 0), diags(n, 0)
    # BilateralSolver.solve(t, c)
    x = target.reshape(-1, 1).astype(np.double)
    wgt = confidence.reshape(-1, 1).astype(np.double)
    a_smooth = dm - dn.dot(grid.blur(dn))
    w_splat = grid.splat(wgt)
    a = 256 * a_smooth + diags(w_splat[:, 0], 0)
    xw = x * wgt
    b = grid.splat(xw)
    a_diag = np.maximum(a.diagonal(), 1e-5)
    precond = diags(1 / a_diag, 0)
    y0 = grid.splat(xw) / w_splat
    yhat = np.empty_like(y0)
    for d in range(x.shape[-1]):
        yhat[..., d], _ = legacy_cg(a, b[..., d], y0[..., d], precond, 25, 1e-5)
    output_solver = grid.slice(yhat).reshape((h, w))
    binary_solver = ndimage.binary_fill_holes(output_solver > 0.5)
    labeled, nr_objects = ndimage.label(binary_solver)
    nb_pixel = [np.sum(labeled == i) for i in range(nr_objects + 1)]
    pixel_order = np.argsort(nb_pixel)
    try:
        binary_solver = labeled == pixel_order[-2]
    except IndexError:
        binary_solver = np.ones((h, w), dtype=bool)
    return output_solver, binary_solver
