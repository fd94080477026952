"""The batch pipeline: image files -> decoded, padded batches on the device -> feature maps.

Read it top to bottom to follow one image: ``PaddedImages`` decodes and pads it (LOST's
protocol, ``lostreg.features.extract.preprocess``), ``size_batches`` groups it with images of the same
padded size (so batching changes no result), the DataLoader's workers stack each group, the
stack is pinned and copied to the device, and ``FeatureSource`` turns it into the feature maps
the runs of a pass ask for: from the feature cache when every map an image needs is stored
there, from the backbone (built on first use) otherwise. What a method then does with them is
``lostreg.runs.sweep``'s business.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset

import lostreg
from lostreg import background, timeline
from lostreg.backbones import (
    Backbone,
    BackboneSpec,
    WeightsInfo,
    build_model,
    create_backbone,
    normalisation,
    resolve_weights,
)
from lostreg.backbones.families import family_of
from lostreg.datasets.base import DEFAULT_MAX_PIXELS, DatasetIndex, ImageRecord, load_rgb
from lostreg.datasets.registry import image_protocol
from lostreg.errors import LostregError
from lostreg.evaluation.saliency_protocol import resize_to_patch_multiple, resized_size
from lostreg.features.cache import (
    BackgroundWriter,
    CacheProblem,
    FeatureCache,
    cache_key,
    image_fingerprint,
    prefetch,
    to_storage,
    warn,
)
from lostreg.features.extract import FeatureRequest, extract, padded_size, preprocess
from lostreg.version import RESULT_VERSION

# --- environment ---------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LostregError(f"--device {name}: CUDA is not available on this machine")
    if name != "cpu" and not name.startswith("cuda"):
        raise LostregError(f"--device {name!r}: expected auto, cpu or cuda[:N]")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LostregError(f"--device {name!r}: expected auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise LostregError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                           "CUDA device(s), numbered from 0")
    return device


def use_device(device: torch.device) -> None:
    """Make ``cuda:N`` the current CUDA device: the DataLoader's pin-memory thread (and any
    CUDA call without an explicit device) otherwise creates a context on GPU 0 as well."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def warm_start(device: torch.device) -> threading.Thread:
    """Start, in a background thread, what the first batch will wait for and the main thread
    does not need yet: importing timm (seconds: it imports every model family) and starting
    CUDA with cuBLAS on ``device``. The main thread meanwhile indexes the dataset and hashes
    the weights; whichever needs these first simply waits for them (imports and CUDA's lazy
    initialisation are locked). Every command's exit path waits for the thread
    (``background.exit_waits_for``): an error found meanwhile (a bad ``--weights``) must not
    end the interpreter while the thread is still in torch's C++ code, which aborts."""
    def start() -> None:
        try:
            import timm  # noqa: F401

            if device.type == "cuda" and not background.exiting():
                with torch.cuda.device(device):
                    ones = torch.ones(8, 8, device=device)
                    (ones @ ones).sum().item()
        except Exception:  # noqa: BLE001 - only a head start: the main thread meets any failure
            return
        timeline.mark("timm imported" + (" and CUDA started" if device.type == "cuda" else ""))

    thread = threading.Thread(target=start, name="lostreg-warm-start", daemon=True)
    thread.start()
    background.exit_waits_for(thread)
    return thread


def set_numerics(precision: str) -> dict:
    """No TF32 in matmuls or cuDNN convolutions, whatever the precision: fp32 is exact fp32,
    and LOST's similarities are float32 matmuls in every run (with bf16/fp16 the backbone's
    matmuls and its patch embedding run in that dtype under autocast, so TF32 would only have
    rounded LOST's ``F F^T``)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return {
        "precision": precision,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "lost_similarity_dtype": "float32",
        "lost_sum_dtype": "float64",
    }


# the dtype the backbone runs in under autocast, per ``--precision`` (fp32: no autocast)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16,
                                                  "fp16": torch.float16}


# --- images -> batches ---------------------------------------------------------------------


def too_large(height: int, width: int, max_pixels: int) -> str | None:
    if height * width <= max_pixels:
        return None
    return (f"{width}x{height} = {height * width:,} pixels is above --max-pixels {max_pixels} "
            "(images are not resized: raise --max-pixels to run it anyway)")


def check_image_sizes(records: Sequence[ImageRecord], max_pixels: int) -> None:
    """Refuse, before any forward, a dataset holding an image above ``max_pixels`` (by its
    annotated size; a decoded image that turns out larger is refused when decoded)."""
    large = [r for r in records if too_large(r.height, r.width, max_pixels)]
    if large:
        more = f" (and {len(large) - 1} more)" if len(large) > 1 else ""
        raise LostregError(f"{large[0].path}: {too_large(large[0].height, large[0].width, max_pixels)}"
                           f"{more}")


@contextlib.contextmanager
def out_of_memory_as_error(what: Callable[[], str]) -> Iterator[None]:
    """Turn running out of memory (GPU or host) into one line naming the images (``what``)."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise LostregError(f"{what()}: out of GPU memory; lower --batch-size or --max-pixels") \
            from None
    except RuntimeError as exc:
        if "can't allocate memory" not in str(exc) and "out of memory" not in str(exc):
            raise
        raise LostregError(f"{what()}: out of memory; lower --batch-size or --max-pixels") \
            from None


class PaddedImages(Dataset):
    """Decode + normalise + pad one record; errors come back as data, not exceptions, so one
    bad file never loses the batch around it.

    ``image_protocol="resize"`` (saliency sets: TokenCut's ``resize_pil``) resizes the image
    with LANCZOS to the nearest patch multiple first, so nothing is padded; the size handed on
    is still the original ``(H, W)``, the size its mask is upsampled back to."""

    def __init__(self, records: Sequence[ImageRecord], mean, std, patch_size: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS, image_protocol: str = "pad") -> None:
        self.records = records
        self.mean, self.std, self.patch_size = mean, std, patch_size
        self.max_pixels = max_pixels
        self.resize = image_protocol == "resize"

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, position: int) -> dict:
        record = self.records[position]
        try:
            image = load_rgb(record.path, self.max_pixels)
            problem = too_large(image.height, image.width, self.max_pixels)
            if problem:  # its annotation said it was smaller
                raise LostregError(f"{record.path}: {problem}")
            if self.resize:
                size = (image.height, image.width)
                try:
                    image = resize_to_patch_multiple(image, self.patch_size)
                except LostregError as exc:
                    raise LostregError(f"{record.path}: {exc}") from None
                tensor, _ = preprocess(image, self.mean, self.std, self.patch_size)
            else:
                tensor, size = preprocess(image, self.mean, self.std, self.patch_size)
        except LostregError as exc:
            return {"position": position, "error": str(exc)}
        return {"position": position, "tensor": tensor, "size": size, "error": None}


def _batch_shape(record: ImageRecord, patch_size: int, image_protocol: str) -> tuple[int, int]:
    """The input shape a record's image gets: padded, or resized to a patch multiple (an
    image too small to resize is grouped by its padded size and reported when decoded)."""
    if image_protocol == "resize":
        try:
            width, height = resized_size(record.width, record.height, patch_size)
            return height, width
        except LostregError:
            pass
    return padded_size(record.height, record.width, patch_size)


def size_batches(records: Sequence[ImageRecord], patch_size: int,
                 batch_size: int, image_protocol: str = "pad") -> list[list[int]]:
    """Batches of positions whose images share one padded (or, for ``resize``, resized) size
    (from the annotated size), in dataset order of first appearance."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for position, record in enumerate(records):
        groups[_batch_shape(record, patch_size, image_protocol)].append(position)
    return [members[i:i + batch_size] for members in groups.values()
            for i in range(0, len(members), batch_size)]


@dataclass
class ImageGroup:
    """Decoded images of one padded shape, stacked (``(b, 3, Hp, Wp)``) in a loader worker."""

    positions: list[int]
    images: torch.Tensor
    sizes: list[tuple[int, int]]


@dataclass
class LoadedBatch:
    """One sampler batch as the loader hands it over: stacked groups and per-image errors.

    Stacking happens in the worker, so the main process (which drives the model) does not
    copy images; ``pin_memory`` lets the DataLoader pin the stacks for async host-to-GPU copies.
    """

    groups: list[ImageGroup]
    errors: list[str]
    n_items: int

    def pin_memory(self) -> LoadedBatch:
        for group in self.groups:
            group.images = group.images.pin_memory()
        return self


def collate_by_shape(items: list[dict]) -> LoadedBatch:
    """Stack decoded items by their actual padded shape (the annotated size may be wrong, so
    one sampler batch can hold several shapes), in batch order; bad images become errors."""
    groups: dict[tuple[int, ...], list[dict]] = defaultdict(list)
    errors = []
    for item in items:
        if item["error"]:
            errors.append(item["error"])
        else:
            groups[tuple(item["tensor"].shape)].append(item)
    return LoadedBatch(
        [ImageGroup([item["position"] for item in group],
                    torch.stack([item["tensor"] for item in group]),
                    [tuple(item["size"]) for item in group]) for group in groups.values()],
        errors, len(items))


def decode_workers(device: torch.device) -> int:
    """Default decoding processes. With the model on the CPU, its forward already keeps every
    core busy and workers only compete with it (on 2 cores: 0 workers ran 0.95x a bare
    forward loop, 1-2 workers 0.80x, see benchmarks/README.md), so decode in the main
    process; on a GPU the cores are free to decode ahead of the forward."""
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


def iterate_batches(records: Sequence[ImageRecord], backbone: Backbone | BackboneInfo,
                    batch_size: int, num_workers: int | None,
                    device: torch.device, max_pixels: int = DEFAULT_MAX_PIXELS,
                    image_protocol: str = "pad") -> Iterator[LoadedBatch]:
    """Yield the records' images decoded, padded (or resized, see ``PaddedImages``) and
    stacked by shape, batch by batch (``num_workers=None``: ``decode_workers(device)``)."""
    if num_workers is None:
        num_workers = decode_workers(device)
    dataset = PaddedImages(records, backbone.mean, backbone.std, backbone.patch_size, max_pixels,
                           image_protocol)
    loader = DataLoader(
        dataset,
        batch_sampler=size_batches(records, backbone.patch_size, batch_size, image_protocol),
        collate_fn=collate_by_shape,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )
    yield from loader


# --- backbones, built only when an image needs them ---------------------------------------


@dataclass
class BackboneInfo:
    """What a run's identity and config.json need about a backbone, known without building
    it: a pass whose images are all cached never creates the model."""

    spec: BackboneSpec
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: WeightsInfo
    num_prefix_tokens: int
    num_params: int
    depth: int  # number of transformer blocks

    @property
    def patch_size(self) -> int:
        return self.spec.patch_size


def describe_backbone(spec: BackboneSpec, weights: str) -> BackboneInfo:
    """The backbone's identity without its weights in memory: hub weights are resolved (and
    downloaded if needed) and hashed, a file is hashed, ``random`` is ``random``; shapes and
    the parameter count come from a model built on the meta device (no memory)."""
    info, _ = resolve_weights(spec, weights)
    try:
        model = build_model(spec, meta=True)
    except Exception:  # noqa: BLE001 - some models cannot be built on meta: build them for real
        model = build_model(spec)
    mean, std = normalisation(spec)
    family = family_of(model, spec.name)
    return BackboneInfo(spec, mean, std, info, family.num_prefix_tokens(model),  # type: ignore[arg-type]
                        sum(p.numel() for p in model.parameters()), len(family.blocks(model)))


class LazyBackbone:
    """The backbone of one model, created on first use and then shared by every dataset."""

    def __init__(self, info: BackboneInfo | Backbone, weights: str, device: torch.device,
                 backbone: Backbone | None = None) -> None:
        self.info, self.weights, self.device = info, weights, device
        self._backbone = backbone

    def get(self) -> Backbone:
        if self._backbone is None:
            self._backbone = create_backbone(self.info.spec, self.weights, self.device)
            timeline.mark("model built")
            if self._backbone.weights.identity() != self.info.weights.identity():
                raise LostregError(f"{self._backbone.weights.path}: weights changed since the "
                                   "run started (sha256 differs); rerun the command")
        return self._backbone

    def release(self) -> None:
        self._backbone = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# --- batches -> feature maps ---------------------------------------------------------------


@dataclass
class FeatureBatch:
    """One feature map for images of one padded size: ``feats`` ``(b, rows*cols, D)`` float32
    on the device, with each image's dataset position and actual ``(H, W)``, and ``finite``:
    per image, whether every value of its map is finite (``finite_images``; bool ``(b,)`` on
    the device, read by the line writer with the method's results)."""

    request: FeatureRequest
    feats: torch.Tensor
    grid: tuple[int, int]
    positions: list[int]
    sizes: list[tuple[int, int]]
    finite: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.finite is None:
            self.finite = finite_images(self.feats)


def finite_images(feats: torch.Tensor) -> torch.Tensor:
    """Per image of ``feats`` ``(b, ...)``, whether every value is finite: bool ``(b,)`` on the
    features' device, queued there without waiting for it (no host sync; the line writer reads
    it with the boxes, after the batch's event). NaN or inf features (a broken checkpoint, or a
    backbone overflowing in fp16/bf16) would still give a box, so such an image gets none
    (``lostreg.runs.predictions``: a ``nonfinite`` line). One reduction per batch: the maps are
    small beside the forward that made them (``benchmarks/bench_extraction.py``)."""
    return torch.isfinite(feats.flatten(1)).all(dim=1)


@dataclass
class SourceStep:
    """What a feature source delivers per step: feature batches, per-image decoding errors,
    and how many loader items the step covered (0 for cached steps)."""

    batches: list[FeatureBatch]
    errors: list[str] = field(default_factory=list)
    n_items: int = 0


def feature_cache_key(info: Backbone | BackboneInfo, index: DatasetIndex,
                      request: FeatureRequest, precision: str, storage: str) -> dict:
    """Everything that decides one cached feature map (see ``lostreg.features.cache``); the layer
    enters only when it is not ``-1`` (the last block), so last-block keys have the fields they had
    before ``--layer`` existed."""
    key = cache_key(
        model=info.spec.name, timm_name=info.spec.timm_name, model_kwargs=info.spec.model_kwargs,
        weights=info.weights.identity(), num_prefix_tokens=info.num_prefix_tokens,
        mean=info.mean, std=info.std, patch_size=info.spec.patch_size,
        pos_embed=info.spec.pos_embed_mode, dataset=index.name, split=index.split,
        feature=request.kind, precision=precision, storage=storage,
        lostreg_version=lostreg.__version__, result_version=RESULT_VERSION)
    if request.layer != -1:
        key["layer"] = request.layer
    if image_protocol(index.name) != "pad":  # resized inputs give other features
        key["image_protocol"] = image_protocol(index.name)
    key.update(info.spec.identity_extras())  # +ttr's neurons; nothing for a default model
    return key


Needs = Callable[[int], set[FeatureRequest]]


class FeatureSource:
    """The feature maps of a pass's images: from the cache, or through the backbone.

    ``needs(position)`` says which maps an image still needs (it shrinks as runs are served,
    so it is asked again at every step). ``stats`` counts ``backbone_images``,
    ``cached_images`` and the seconds spent producing features (``forward``).
    """

    def __init__(self, records: Sequence[ImageRecord], lazy: LazyBackbone, device: torch.device,
                 *, batch_size: int, num_workers: int | None, autocast: torch.dtype | None,
                 caches: dict[FeatureRequest, FeatureCache], storage: str | None,
                 lossless: bool, writer: BackgroundWriter | None, stats: dict,
                 max_pixels: int = DEFAULT_MAX_PIXELS, image_protocol: str = "pad") -> None:
        self.records, self.lazy, self.device = records, lazy, device
        self.image_protocol = image_protocol
        self.batch_size, self.num_workers, self.autocast = batch_size, num_workers, autocast
        self.max_pixels = max_pixels
        self.caches, self.storage, self.lossless, self.writer = caches, storage, lossless, writer
        self.stats = stats
        self._fingerprints: dict[int, str | None] = {}

    def _fingerprint(self, position: int) -> str | None:
        """The content hash the cache keys an image by (computed once per pass)."""
        if position not in self._fingerprints:
            self._fingerprints[position] = image_fingerprint(self.records[position].path,
                                                             self.max_pixels)
        return self._fingerprints[position]

    def _lookup(self, position: int, request: FeatureRequest):
        return self.caches[request].lookup(self.records[position].image_id,
                                           self._fingerprint(position))

    def fully_cached(self, positions: Sequence[int], needs: Needs) -> list[int]:
        """The positions whose every needed map is in the cache: they never need the model."""
        if not self.caches:
            return []
        missing = [p for p in positions if p not in self._fingerprints]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashing
            hashes = pool.map(lambda p: image_fingerprint(self.records[p].path, self.max_pixels),
                              missing)
            self._fingerprints.update(zip(missing, hashes, strict=True))  # releases the GIL
        return [p for p in positions
                if all(r in self.caches and self._lookup(p, r) for r in needs(p))]

    def cached(self, positions: Sequence[int], needs: Needs) -> Iterator[SourceStep]:
        """Cached maps of ``positions``, shard by shard, read ahead in a background thread; a
        bad shard is reported, forgotten and its images are left to the backbone."""
        for request, cache in self.caches.items():
            wanted: dict[str, list[tuple[int, int]]] = {}
            for p in positions:
                if request in needs(p):
                    entry = self._lookup(p, request)
                    wanted.setdefault(entry.shard, []).append((p, entry.row))
            for name, shard in prefetch(cache.read, list(wanted)):
                members = wanted[name]
                if not isinstance(shard, CacheProblem) and any(
                        row >= len(shard.image_ids)
                        or shard.image_ids[row] != self.records[p].image_id
                        for p, row in members):
                    shard = CacheProblem(f"{shard.path}: rows do not match the cache index")
                if isinstance(shard, CacheProblem):
                    warn(f"feature cache: {shard}; recomputing its {len(members)} images")
                    cache.forget(name)
                    continue
                yield from self._shard_steps(request, shard, members)

    def _shard_steps(self, request: FeatureRequest, shard, members) -> Iterator[SourceStep]:
        for start in range(0, len(members), self.batch_size):
            tick = time.perf_counter()
            chunk = members[start:start + self.batch_size]
            rows = [row for _, row in chunk]
            first, last = rows[0], rows[-1]
            if rows == list(range(first, last + 1)):  # the usual case: no copy
                feats = shard.feats[first:last + 1]
            else:
                feats = shard.feats.index_select(0, torch.tensor(rows))
            feats = feats.to(self.device).float()
            self.stats["forward"] += time.perf_counter() - tick
            yield SourceStep([FeatureBatch(request, feats, shard.grid, [p for p, _ in chunk],
                                           [shard.sizes[row] for row in rows])])

    def computed(self, positions: Sequence[int], needs: Needs) -> Iterator[SourceStep]:
        """Every map ``positions`` need, through the backbone (built here on first use), one
        loader batch per step; new maps go into the cache in a background thread."""
        backbone = self.lazy.get()
        records = [self.records[p] for p in positions]
        for loaded in timed_iteration(iterate_batches(
                records, backbone, self.batch_size, self.num_workers, self.device,
                self.max_pixels, self.image_protocol), self.stats, "load"):
            timeline.mark("first batch decoded")
            batches = []
            for group in loaded.groups:
                tick = time.perf_counter()
                batches += self._forward(backbone, [positions[i] for i in group.positions],
                                         group, needs)
                self.stats["backbone_images"] += len(group.positions)
                self.stats["forward"] += time.perf_counter() - tick
            yield SourceStep(batches, loaded.errors, loaded.n_items)

    def _forward(self, backbone: Backbone, positions: list[int], group: ImageGroup,
                 needs: Needs) -> list[FeatureBatch]:
        tick = time.perf_counter()
        images = group.images.to(self.device, non_blocking=True)
        self.stats["transfer"] += time.perf_counter() - tick
        timeline.mark("first batch sent to the device")
        patch = backbone.patch_size
        grid = (images.shape[-2] // patch, images.shape[-1] // patch)
        requests = sorted(set().union(*(needs(p) for p in positions)))
        with out_of_memory_as_error(lambda: describe_images(self.records, positions, group.sizes)):
            maps = extract(backbone, images, requests, self.autocast)
        out = []
        for request, feats in maps.items():
            if request in self.caches:
                feats = self._store(request, feats, positions, group.sizes, grid)
            out.append(FeatureBatch(request, feats, grid, positions, group.sizes))
        return out

    def _store(self, request: FeatureRequest, feats: torch.Tensor, positions: list[int],
               sizes: list[tuple[int, int]], grid: tuple[int, int]) -> torch.Tensor:
        """Queue the maps the cache lacks; returns the features as a cached rerun will see
        them (rounded when the cache stores a narrower dtype)."""
        stored = to_storage(feats, self.storage, self.lossless)  # type: ignore[arg-type]
        if not self.lossless:
            feats = stored.float()
        new = [j for j, p in enumerate(positions) if not self._lookup(p, request)]
        if new:
            self.writer.submit(  # type: ignore[union-attr]
                self.caches[request], [self.records[positions[j]].image_id for j in new],
                [sizes[j] for j in new], [self._fingerprint(positions[j]) for j in new], grid,
                stored[new].to("cpu"))
        return feats


def describe_images(records: Sequence[ImageRecord], positions: Sequence[int],
                    sizes: Sequence[tuple[int, int]]) -> str:
    """The images of a batch for an error line: the first one's file and size, and how many."""
    height, width = sizes[0]
    more = f", in a batch of {len(positions)} of that size" if len(positions) > 1 else ""
    return f"{records[positions[0]].path} ({width}x{height}{more})"


def timed_iteration(items: Iterator, stats: dict, key: str) -> Iterator:
    """``items`` as they come, adding the seconds spent waiting for each to ``stats[key]``
    (for the loader: how long the pass waited for decoded batches)."""
    while True:
        tick = time.perf_counter()
        try:
            item = next(items)
        except StopIteration:
            stats[key] += time.perf_counter() - tick
            return
        stats[key] += time.perf_counter() - tick
        yield item
