"""Plug-in models: score your own ViT, a model from another library, or a training-loop
checkpoint with exactly the pipeline the named backbones run through.

**The protocol** (the smallest interface a user implements) is a function::

    features(images, patch_size) -> PatchFeatures | torch.Tensor

* ``images``: ``(B, 3, H, W)`` float32, normalised with the model's mean/std and zero-padded
  at the bottom and right to multiples of ``patch_size`` (LOST's image protocol: no resizing);
  every image of a batch has the same padded size;
* returned: the patch features ``(B, N, D)`` with ``N = (H / patch_size) * (W / patch_size)``
  patches in row-major order (class, register and any other non-patch token removed), and
  optionally the class token's attention to each patch per head ``(B, N, heads)`` (DINO-seg's
  input), as a ``PatchFeatures``. The grid is ``(H / patch_size, W / patch_size)``.

**Adapters** make three kinds of object usable directly (``adapter_of`` picks, in this order):

* ``family``: a module of a registered family (:mod:`lostreg.backbones.families`: timm's
  ``VisionTransformer``/``Eva``, created with ``dynamic_img_size=True``, or a family you
  registered) is read by that family's hooks: q/k/v/attn of any block, exactly as the named
  backbones;
* ``qkv``: any other module with the usual attention layout (``.blocks[i].attn.qkv``, a fused
  ``nn.Linear`` whose output is q, k, v, each heads x head_dim, and ``attn.num_heads``) is read
  with the same hooks (``UsualLayoutFamily``); the layout is verified on a probe batch (the
  block's attention output must be ``softmax(q k^T scale) v`` of what lostreg reads), otherwise
  it is refused;
* ``forward_features``: a module with ``forward_features(images) -> (B, T, D)`` tokens gives
  its patch tokens (the last ``N``; a DINOv2-style dict gives ``x_norm_patchtokens``);
* ``callable``: a plain function of the protocol above.

The last two *return their own features*: their feature kind is ``own`` (the default of their
runs), and ``attn`` when the function returns it; q/k/v of another block are not there to read.

**Identity** (``Plugin.identity``): a plug-in model's runs and cache entries are named by what
decides its outputs, so two different modules never share a run folder: the source file that
defines the factory or function (sha256), the module class's source file (sha256; a timm
class by its qualified name, as named backbones are by their timm name), the module's state
(sha256 over every ``state_dict`` tensor's name, dtype, shape and bytes, in order), the
adapter, the patch size, the number of prefix tokens, mean and std.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from lostreg.backbones.build import Backbone
from lostreg.backbones.families import FAMILIES, Capture, Family, StopForward, family_of
from lostreg.backbones.registry import ALIASES, BACKBONES, BackboneSpec
from lostreg.errors import LostregError
from lostreg.io import sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ADAPTERS = ("family", "qkv", "forward_features", "callable")
OWN_KIND = "own"  # the feature kind of a model that returns its own features


class PatchFeatures(NamedTuple):
    """What a plug-in function returns for a padded batch ``(B, 3, H, W)``.

    ``feats``: ``(B, N, D)``, N patches in row-major order on ``grid``; ``attn`` (optional):
    the class token's attention to each patch, ``(B, N, heads)``; ``grid`` (optional): the
    ``(rows, cols)`` the function used, checked against ``(H / patch, W / patch)``."""

    feats: torch.Tensor
    attn: torch.Tensor | None = None
    grid: tuple[int, int] | None = None


@runtime_checkable
class PatchFeatureFn(Protocol):
    """The protocol: ``fn(images, patch_size) -> PatchFeatures | (B, N, D) tensor``."""

    def __call__(self, images: torch.Tensor, patch_size: int) -> PatchFeatures | torch.Tensor:
        ...


@dataclass
class UserModel:
    """A model with what lostreg cannot read off it (a factory may return one).

    ``model``: an ``nn.Module`` or a ``PatchFeatureFn``; ``patch_size``: required for a
    function (a module's ``patch_embed.patch_size``/``patch_size`` is used otherwise);
    ``mean``/``std``: the normalisation it was trained with (default: a timm module's
    pretrained config, else ImageNet's); ``num_prefix_tokens``: class + register tokens before
    the patches (default: the module's attribute, else counted on a probe batch);
    ``num_registers``: recorded for the leaderboard; ``name``: the model's name in run ids
    (default: its class or function name); ``weights_of``: the modules a function runs, whose
    state enters its identity (a bound method's module is found by itself)."""

    model: nn.Module | PatchFeatureFn
    patch_size: int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    num_prefix_tokens: int | None = None
    num_registers: int | None = None
    name: str | None = None
    weights_of: nn.Module | Sequence[nn.Module] | None = None


@dataclass(frozen=True)
class Plugin:
    """What identifies a plug-in model (its part of the run identity and of config.json), and
    for a ``py:`` model the loader that builds it (``build``, not part of the identity)."""

    source: str  # "py:pkg.mod:factory", "module:pkg.mod.Class", "callable:pkg.mod.fn"
    source_sha256: str | None = None  # the factory's or the function's file
    model_class: str | None = None  # qualified name of the module's class
    architecture: str | None = None  # a timm module's architecture (its pretrained config)
    class_sha256: str | None = None  # its file (None for a timm class: named by its name)
    adapter: str = ""
    state_sha256: str | None = None
    patch_size: int | None = None
    num_prefix_tokens: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    build: Callable[[BackboneSpec, str, torch.device], Backbone] | None = field(
        default=None, compare=False, repr=False)

    def identity(self) -> dict[str, Any]:
        return {"source": self.source, "source_sha256": self.source_sha256,
                "class": self.model_class, "class_sha256": self.class_sha256,
                "architecture": self.architecture,
                "adapter": self.adapter, "state_sha256": self.state_sha256,
                "patch_size": self.patch_size, "num_prefix_tokens": self.num_prefix_tokens,
                "mean": list(self.mean) if self.mean else None,
                "std": list(self.std) if self.std else None}


# --- hashing -----------------------------------------------------------------------------------


def state_sha256(modules: Iterable[nn.Module]) -> str:
    """sha256 over every ``state_dict`` tensor of ``modules`` (name, dtype, shape, bytes, in
    order): the weights' identity of a module that has no file."""
    digest = hashlib.sha256()
    for index, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
            value = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{index}:{name}:{value.dtype}:{list(tensor.shape)}\n".encode())
            digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def source_sha256(obj: Any) -> str | None:
    """sha256 of the file that defines ``obj`` (a class or function), or of its source text
    where there is no file (a REPL); None when neither can be read."""
    try:
        path = inspect.getsourcefile(obj)
        if path:
            return sha256_file(path)
    except (TypeError, OSError):
        pass
    try:
        return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()
    except (TypeError, OSError):
        return None


def qualified_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def timm_architecture(model: Any) -> str | None:
    """A timm module's architecture name (``vit_small_patch14_reg4_dinov2``), from its
    pretrained config: it fixes what the state does not (activations, norms' epsilon)."""
    cfg = getattr(model, "pretrained_cfg", None)
    if type(model).__module__.split(".")[0] != "timm" or not isinstance(cfg, dict):
        return None
    architecture = cfg.get("architecture")
    return architecture if isinstance(architecture, str) else None


# --- the user's own features -------------------------------------------------------------------


@dataclass
class OwnFeaturesBackbone(Backbone):
    """A plug-in model that returns its own features: ``compute(images)`` gives the raw
    output, checked here against the batch's grid on every call."""

    compute: Callable[[torch.Tensor], Any] | None = None
    provides_attn: bool = False

    @property
    def depth(self) -> int:
        return 1  # the features it returns: no blocks to choose from

    @property
    def kinds(self) -> tuple[str, ...]:
        return (OWN_KIND, "attn") if self.provides_attn else (OWN_KIND,)

    def check_request(self, kind: str, layer: int) -> None:
        """One line for a feature map this model cannot give (another block's, q/k/v, or
        ``attn`` from a function that does not return it)."""
        if layer != -1:
            raise LostregError(f"--layer {layer}: {self.spec.name} returns its own features (its "
                               "last layer's); --layer needs a module whose q/k/v lostreg reads "
                               "(.blocks[i].attn.qkv)")
        if kind not in self.kinds:
            hint = " (return PatchFeatures(feats, attn=...) for DINO-seg)" if kind == "attn" else ""
            raise LostregError(f"--features {kind}: {self.spec.name} returns its own features, so "
                               f"it offers {'/'.join(self.kinds)} only{hint}")

    def patch_features(self, images: torch.Tensor) -> PatchFeatures:
        """The checked ``PatchFeatures`` of a padded batch."""
        assert self.compute is not None
        return checked_features(self.compute(images), images, self.patch_size, self.spec.name)


def checked_features(out: Any, images: torch.Tensor, patch_size: int, label: str) -> PatchFeatures:
    """``out`` as ``PatchFeatures`` with the shapes the methods need, or one line naming the
    model and saying what was expected."""
    batch = images.shape[0]
    grid = (images.shape[-2] // patch_size, images.shape[-1] // patch_size)
    n = grid[0] * grid[1]
    if isinstance(out, torch.Tensor):
        out = PatchFeatures(out)
    if not isinstance(out, PatchFeatures):
        raise LostregError(f"{label}: returned {type(out).__name__}; expected a (B, N, D) tensor "
                           "or lostreg.PatchFeatures(feats, attn=None)")
    images_word = "image" if batch == 1 else "images"
    expected = f"({batch}, {n}, D) for a batch of {batch} {images_word} of {grid[0]}x{grid[1]} patches"
    feats = out.feats
    if not isinstance(feats, torch.Tensor) or feats.ndim != 3 or tuple(feats.shape[:2]) != (batch, n):
        shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        hint = (" (a (B, D, rows, cols) map: return x.flatten(2).transpose(1, 2))"
                if isinstance(feats, torch.Tensor) and feats.ndim == 4 else "")
        raise LostregError(f"{label}: returned features of shape {shape}; expected {expected} "
                           f"(patch tokens only, row-major){hint}")
    if out.grid is not None and tuple(out.grid) != grid:
        raise LostregError(f"{label}: returned grid {tuple(out.grid)}; expected {grid} "
                           f"(the padded image / patch size {patch_size})")
    if out.attn is not None and (not isinstance(out.attn, torch.Tensor) or out.attn.ndim != 3
                                 or tuple(out.attn.shape[:2]) != (batch, n)):
        shape = tuple(out.attn.shape) if isinstance(out.attn, torch.Tensor) else type(out.attn).__name__
        raise LostregError(f"{label}: returned attention of shape {shape}; expected "
                           f"({batch}, {n}, heads): the class token's attention to each patch")
    if not feats.is_floating_point():
        raise LostregError(f"{label}: returned {feats.dtype} features; expected floating point")
    return PatchFeatures(feats, out.attn, grid)


def forward_features_fn(module: nn.Module, prefix: int | None) -> Callable[[torch.Tensor], Any]:
    """``module.forward_features`` as the protocol: its patch tokens (the tokens after the
    ``prefix`` class and register tokens; a dict's ``x_norm_patchtokens``)."""
    def compute(images: torch.Tensor) -> Any:
        tokens = module.forward_features(images)
        if isinstance(tokens, dict) and "x_norm_patchtokens" in tokens:
            return tokens["x_norm_patchtokens"]
        if isinstance(tokens, torch.Tensor) and tokens.ndim == 3 and prefix is not None:
            return tokens[:, prefix:]
        return tokens
    return compute


# --- the usual attention layout -----------------------------------------------------------------


class UsualLayoutFamily(Family):
    """Reads a module of the usual attention layout that no registered family claims: the
    fused ``attn.qkv`` projection of each block (q, k, v, each ``num_heads x head_dim``), with
    the attention's ``q_norm``/``k_norm`` where it has them; the forward is the module's
    ``forward_features`` (else its ``forward``), stopped by the hooks at the block read. One
    instance per plug-in model (it holds the model's prefix-token count); never registered in
    ``FAMILIES``: only a plug-in model asks for it, and only after its layout is verified."""

    name = "usual-layout"
    description = "a module with .blocks[i].attn.qkv (fused q/k/v) and attn.num_heads"

    def __init__(self, num_prefix_tokens: int = 0) -> None:
        self.prefix = num_prefix_tokens

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return self.prefix

    def forward(self, model: nn.Module, images: torch.Tensor) -> None:
        run = getattr(model, "forward_features", None)
        run(images) if callable(run) else model(images)

    def tap(self, block: nn.Module, capture: Capture, ready: Callable[[], None]) -> list:
        def on_qkv(_module, _inputs, output):
            capture.parts["qkv"] = output
            ready()

        return [block.attn.qkv.register_forward_hook(on_qkv)]

    def rotate(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor,
               rope: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        return (q_norm(q) if isinstance(q_norm, nn.Module) else q,
                k_norm(k) if isinstance(k_norm, nn.Module) else k)

    def num_registers(self, model: nn.Module) -> int:
        count = getattr(model, "num_register_tokens", None)
        if isinstance(count, int):
            return count
        return super().num_registers(model)


def usual_layout_problem(model: nn.Module) -> str | None:
    """Why ``model`` is not of the usual attention layout (one clause), or None."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        return "it has no .blocks (an nn.ModuleList of transformer blocks)"
    for index, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        qkv = getattr(attn, "qkv", None)
        if not isinstance(qkv, nn.Linear):
            return f"block {index} has no attn.qkv nn.Linear (fused q/k/v projection)"
        heads = getattr(attn, "num_heads", None)
        if not isinstance(heads, int) or heads < 1 or qkv.out_features % (3 * heads):
            return (f"block {index}: attn.num_heads ({heads!r}) does not split attn.qkv's "
                    f"{qkv.out_features} outputs into q, k, v of equal heads")
    return None


def probe_images(patch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A seeded random ``(1, 3, 2p, 3p)`` batch: distinct patches on a non-square grid, so a
    wrong layout or a transposed grid shows."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, 2 * patch_size, 3 * patch_size, generator=generator)
    return images.to(device=device, dtype=dtype)


def _layout_output(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last block's qkv projection output and its attention's output on ``images``."""
    attn = model.blocks[-1].attn
    seen: dict[str, torch.Tensor] = {}

    def on_qkv(_module, _inputs, output):
        seen["qkv"] = output

    def on_attn(_module, _inputs, output):
        seen["out"] = output[0] if isinstance(output, tuple) else output
        raise StopForward

    handles = [attn.qkv.register_forward_hook(on_qkv), attn.register_forward_hook(on_attn)]
    try:
        with torch.inference_mode():
            UsualLayoutFamily().forward(model, images)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if "qkv" not in seen or "out" not in seen:
        raise LostregError("the forward never reached the last block's attention")
    return seen["qkv"], seen["out"]


def check_usual_layout(model: nn.Module, images: torch.Tensor, label: str) -> int:
    """Verify on ``images`` that the last block's attention is ``softmax(q k^T scale) v`` of
    the q/k/v lostreg reads (then its ``proj``); return the token count. One line otherwise:
    features read from a differently packed ``qkv`` would be silently wrong."""
    qkv, out = _layout_output(model, images)
    attn = model.blocks[-1].attn
    batch, tokens, _ = qkv.shape
    with torch.inference_mode():
        q, k, v = qkv.float().reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = UsualLayoutFamily().rotate(attn, q, k, None, v.dtype)
        scale = getattr(attn, "scale", q.shape[-1] ** -0.5)
        mixed = ((q.float() @ k.float().transpose(-2, -1)) * scale).softmax(dim=-1) @ v
        mixed = mixed.transpose(1, 2).reshape(batch, tokens, -1)
        for step in ("norm", "proj"):
            layer = getattr(attn, step, None)
            if isinstance(layer, nn.Module):
                mixed = layer(mixed.to(out.dtype)).float()
    out = out.float()
    tolerance = 1e-3 * max(1.0, float(out.abs().max()))
    if mixed.shape != out.shape or not torch.allclose(mixed, out, rtol=1e-3, atol=tolerance):
        raise LostregError(
            f"{label}: its last block's attention output is not softmax(q k^T * scale) v (then "
            "attn.proj) of attn.qkv's output read as q, k, v of num_heads x head_dim, so lostreg "
            "cannot read its q/k/v; return the features yourself: a function (images, "
            "patch_size) -> (B, N, D) (see lostreg.backbones.plugin)")
    return tokens


# --- choosing and building an adapter -----------------------------------------------------------


def has_timm_class(model: Any) -> bool:
    return any(cls.__module__.split(".")[0] == "timm" for cls in type(model).__mro__)


def registered_family(model: nn.Module, label: str) -> Family | None:
    """The registered family that reads ``model`` (one line when it claims the model but cannot
    read it, or for a timm model built without ``dynamic_img_size``), or None."""
    import timm  # noqa: F401 - the whole package first: a background thread may be importing it

    if not any(family.matches(model) for family in FAMILIES):
        return None
    family = family_of(model, label)
    if has_timm_class(model) and not getattr(model, "dynamic_img_size", False):
        raise LostregError(
            f"{label}: this timm model was created without dynamic_img_size=True, so it runs at "
            "its training size only; lostreg runs every image at its own size (LOST's protocol): "
            "create it with timm.create_model(..., dynamic_img_size=True) and load your weights")
    return family


def adapter_of(model: Any, label: str) -> str:
    """Which adapter reads ``model`` (see the module docstring), or one line saying why none."""
    if isinstance(model, nn.Module):
        if registered_family(model, label) is not None:
            return "family"
        problem = usual_layout_problem(model)
        if problem is None:
            return "qkv"
        if callable(getattr(model, "forward_features", None)):
            return "forward_features"
        raise LostregError(
            f"{label}: {type(model).__name__} is not a module lostreg can read ({problem}, and it "
            "has no forward_features); wrap it in a function (images, patch_size) -> (B, N, D) "
            "patch features")
    if callable(model):
        return "callable"
    raise LostregError(f"{label}: got {type(model).__name__}; expected an nn.Module, a function "
                       "(images, patch_size) -> features, or lostreg.UserModel(...)")


def safe_name(text: str) -> str:
    """A model name usable in a folder name."""
    return re.sub(r"[^A-Za-z0-9_.:+-]+", "_", text).strip("_") or "model"


def check_name(name: str) -> str:
    """A user's model name: usable in a folder name, and never a named backbone's (its rows
    would sit beside the published figures of that backbone)."""
    if not re.fullmatch(r"[A-Za-z0-9_.:+-]+", name):
        raise LostregError(f"name {name!r}: use letters, digits and _ . : + - only")
    if name in BACKBONES or name in ALIASES or name.startswith("timm:"):
        raise LostregError(f"name {name!r} is a named backbone's; give your model its own name")
    return name


__all__ = [
    "ADAPTERS", "IMAGENET_MEAN", "IMAGENET_STD", "OWN_KIND", "OwnFeaturesBackbone",
    "PatchFeatureFn", "PatchFeatures", "Plugin", "UserModel", "UsualLayoutFamily", "adapter_of",
    "check_name", "check_usual_layout", "has_timm_class", "registered_family",
    "checked_features", "probe_images", "qualified_name", "safe_name", "source_sha256",
    "state_sha256", "timm_architecture", "usual_layout_problem",
]
