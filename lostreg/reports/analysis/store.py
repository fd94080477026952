"""Per-token maps of one norms analysis, stored compactly next to ``norms.json``.

Format (``tokens.npz``, a plain numpy archive, no pickles): the maps of all images are
concatenated into flat float16 arrays, one slice per image:

* ``image_ids`` (unicode array, dataset order), ``grids`` ``(n, 2)`` int32 ``(rows, cols)``,
  ``offsets`` ``(n + 1,)`` int64: image ``i``'s tokens are ``[offsets[i], offsets[i+1])``,
  row-major on its grid;
* ``layers`` int32: the block indices stored; ``norms_<layer>``: float16 token norms per layer;
* ``neighbour_sim``: float16 mean cosine similarity of each token's input patch embedding to
  its 4 neighbours (NaN for a 1x1 grid).

float16 keeps ~3 significant digits, enough for a norm histogram, and a VOC07 analysis stays at
~13 MB per layer. Every statistic in ``norms.json`` is computed *from the float16 values*, so
outlier maps recomputed from this file agree exactly with the json.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lostreg.errors import LostregError
from lostreg.io import atomic_write_bytes

FORMAT_VERSION = 1


@dataclass
class TokenMaps:
    """Flat per-token arrays of many images; see the module docstring for the layout."""

    image_ids: list[str]
    grids: np.ndarray
    offsets: np.ndarray
    norms: dict[int, np.ndarray]
    neighbour_sim: np.ndarray
    _positions: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._positions = {image_id: i for i, image_id in enumerate(self.image_ids)}

    @classmethod
    def from_images(cls, image_ids: list[str], grids: list[tuple[int, int]],
                    norms: dict[int, list[np.ndarray]], neighbour_sim: list[np.ndarray]
                    ) -> TokenMaps:
        """Concatenate per-image flat arrays (already in the wanted order)."""
        sizes = [int(r * c) for r, c in grids]
        offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])

        def flat(parts: list[np.ndarray]) -> np.ndarray:
            if not parts:
                return np.zeros(0, dtype=np.float16)
            return np.concatenate([np.asarray(p, dtype=np.float16).ravel() for p in parts])

        return cls(list(image_ids), np.asarray(grids, dtype=np.int32).reshape(-1, 2), offsets,
                   {layer: flat(parts) for layer, parts in norms.items()}, flat(neighbour_sim))

    @property
    def layers(self) -> list[int]:
        return sorted(self.norms)

    def __len__(self) -> int:
        return len(self.image_ids)

    def position(self, image_id: str) -> int | None:
        return self._positions.get(image_id)

    def grid(self, i: int) -> tuple[int, int]:
        return int(self.grids[i, 0]), int(self.grids[i, 1])

    def _slice(self, array: np.ndarray, i: int) -> np.ndarray:
        rows, cols = self.grid(i)
        return array[self.offsets[i]:self.offsets[i + 1]].astype(np.float32).reshape(rows, cols)

    def norm_map(self, i: int, layer: int) -> np.ndarray:
        """Token norms of image ``i`` at ``layer`` as a ``(rows, cols)`` float32 grid."""
        return self._slice(self.norms[layer], i)

    def save(self, path: str | Path) -> None:
        """Write the archive atomically (compressed; no pickled objects)."""
        arrays = {
            "format_version": np.array(FORMAT_VERSION, dtype=np.int32),
            "image_ids": np.asarray(self.image_ids, dtype=np.str_),
            "grids": self.grids.astype(np.int32),
            "offsets": self.offsets.astype(np.int64),
            "layers": np.asarray(self.layers, dtype=np.int32),
            "neighbour_sim": self.neighbour_sim.astype(np.float16),
        }
        for layer, values in self.norms.items():
            arrays[f"norms_{layer}"] = values.astype(np.float16)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> TokenMaps:
        path = Path(path)
        if not path.is_file():
            raise LostregError(f"{path}: token map file not found")
        try:
            with np.load(path, allow_pickle=False) as data:
                layers = [int(v) for v in data["layers"]]
                maps = cls([str(v) for v in data["image_ids"]], data["grids"], data["offsets"],
                           {layer: data[f"norms_{layer}"] for layer in layers},
                           data["neighbour_sim"])
        except (OSError, KeyError, ValueError) as exc:
            raise LostregError(f"{path}: not a lostreg token map archive ({exc})") from None
        total = int(maps.offsets[-1]) if maps.offsets.size else 0
        sizes_ok = maps.offsets.size == len(maps) + 1 and np.array_equal(
            np.diff(maps.offsets), maps.grids[:, 0].astype(np.int64) * maps.grids[:, 1])
        if not sizes_ok or any(v.size != total for v in [maps.neighbour_sim, *maps.norms.values()]):
            raise LostregError(f"{path}: inconsistent offsets, grids and arrays")
        return maps
