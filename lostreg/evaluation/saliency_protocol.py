"""The image protocol of TokenCut's saliency evaluation, as small pure functions.

Source: ``YangtaoWANG95/TokenCut`` @ ``ce70ed6176b1876212f0a3d1144d28507c81427d``,
``unsupervised_saliency_detection/``:

* ``utils.py: resize_pil``: ``new_w = int(round(w / p)) * p`` (same for ``h``), Python's
  ``round`` (half to even: 200 px at p = 16 is 12.5 patches -> 12 -> 192 px, 232 px -> 14.5
  -> 14, 216 px -> 13.5 -> 14), then ``I.resize((new_w, new_h), resample=Image.LANCZOS)``;
  the feature grid is ``(new_h // p, new_w // p)``. This differs from the CorLoc pipeline,
  which pads to a multiple of the patch size instead of resizing.
* ``object_discovery.py: ncut``: the mask scored is **the seed's connected component** of the
  bipartition (``ndimage.label`` with its default 4-connected structure, then
  ``objects == objects[seed]``), not the whole bipartition; as float64 0/1 on the grid, then
  ``F.interpolate(mask[None, None], size=(h, w), mode='nearest')`` to the **original** image
  size, so a patch row maps to ``h / rows`` pixel rows, not to exactly ``p``.
* torch's ``'nearest'`` takes source index ``min(floor(dst * scale), in - 1)`` with
  ``scale = float(in) / out`` and the product both in **float32** (ATen ``UpSample.h``:
  ``nearest_neighbor_compute_source_index(const float scale, ...)`` with ``floorf(dst_index *
  scale)``, as in the torch 1.7 sources TokenCut's README names; the CUDA kernel it ran uses
  the same formula). Today's CPU kernel still gives exactly that for float32 tensors (tested
  against ``torch.nn.functional.interpolate``); for float64 tensors it now rounds differently
  on about 2% of (in, out) size pairs (247 of 11,427 tried), so the tests compare with a
  float32 tensor. It is
  neither PIL's NEAREST (pixel centres) nor the exact ``floor(dst * in / out)``: at 2 -> 282
  the float32 product puts output 141 on source 0, the exact one on source 1.
* GT masks are read with PIL (``Image.open(gt).convert('L')``), see
  ``lostreg.evaluation.saliency.read_gray_mask``; OpenCV is not used by this protocol.

LOST masks use the same protocol with LOST's own seed component (``lostreg.methods.lost.
lost_with_mask``): see ``docs_saliency_notes.md`` for why (no public code behind the LOST
rows of FOUND's Table 2 was found).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from lostreg.errors import LostregError

# the name run ids and config.json give this protocol (``mask_protocol``): TokenCut's saliency
# code's resize, the method's patch mask, torch-nearest upsampling to the original size
MASK_PROTOCOL = "tokencut-saliency"


def resized_size(width: int, height: int, patch_size: int) -> tuple[int, int]:
    """``(new_w, new_h)``: each side rounded (half to even) to a multiple of ``patch_size``."""
    if patch_size < 1 or width < 1 or height < 1:
        raise LostregError(f"resize: bad size {width}x{height} or patch size {patch_size}")
    new_w = int(round(width / patch_size)) * patch_size
    new_h = int(round(height / patch_size)) * patch_size
    if new_w == 0 or new_h == 0:
        raise LostregError(f"resize: a {width}x{height} image rounds to no {patch_size}-px "
                           f"patch (TokenCut's resize_pil would fail too)")
    return new_w, new_h


def feature_grid(width: int, height: int, patch_size: int) -> tuple[int, int]:
    """``(rows, cols)`` of patches of the resized image."""
    new_w, new_h = resized_size(width, height, patch_size)
    return new_h // patch_size, new_w // patch_size


def resize_to_patch_multiple(image: Image.Image, patch_size: int) -> Image.Image:
    """TokenCut's ``resize_pil``: LANCZOS to ``resized_size`` (the model input)."""
    new_w, new_h = resized_size(image.width, image.height, patch_size)
    return image.resize((new_w, new_h), resample=Image.LANCZOS)


def nearest_source_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output index under torch's ``'nearest'`` (float32 arithmetic)."""
    if in_size < 1 or out_size < 1:
        raise LostregError(f"nearest upsampling: sizes must be positive, got {in_size} -> "
                           f"{out_size}")
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(source, in_size - 1)


def upsample_patch_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A ``(rows, cols)`` patch mask to the original ``size = (h, w)`` as TokenCut does it:
    float64 0/1 (``bipartition.cpu().numpy()`` of a float64 interpolation)."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        raise LostregError(f"upsample: expected a 2-D patch mask, got "
                           f"{getattr(mask, 'shape', type(mask))}")
    rows = nearest_source_indices(mask.shape[0], size[0])
    cols = nearest_source_indices(mask.shape[1], size[1])
    return mask.astype(np.float64)[rows[:, None], cols[None, :]]


def seed_component(bipartition: np.ndarray, seed: int) -> np.ndarray:
    """TokenCut's ``detect_box`` mask: the 4-connected component of ``bipartition`` (rows, cols)
    holding the flat ``seed`` index. As in the reference, a seed outside the bipartition has
    label 0 and selects the *background* (TokenCut's ``ncut`` flips the partition first so
    that cannot happen; LOST's path in lostreg uses the seed's own patch instead)."""
    if not 0 <= seed < bipartition.size:
        raise LostregError(f"seed {seed} is outside the {bipartition.shape} grid")
    import scipy.ndimage as ndi  # here, not at the top: the feature pipeline imports this
    # module for the resize, and ``import lostreg.run`` must not wait for SciPy

    objects, _ = ndi.label(bipartition)
    return objects == objects[np.unravel_index(seed, bipartition.shape)]
