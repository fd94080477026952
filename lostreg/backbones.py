"""Backbone registry: one entry maps a short name to a timm model and how to use it.

Adding a backbone is one ``register_backbone`` call. Each entry records what the benchmark
needs to be exact: the timm name with its pretrained tag, patch size, number of register
tokens, the feature LOST uses by default, and how the model's original code resamples its
position embeddings for a new image size (timm's own default differs for some families).
Normalisation (mean/std) comes from timm's pretrained config, so CLIP models get CLIP's.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lostreg.errors import LostregError
from lostreg.io import sha256_file

POS_EMBED_MODES = ("timm", "dino", "dinov2", "dinov2_reg")


@dataclass(frozen=True)
class BackboneSpec:
    """What the benchmark knows about one backbone."""

    name: str
    timm_name: str
    family: str
    patch_size: int
    num_registers: int
    default_feature: str = "k"
    pos_embed: str = "timm"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def arch(self) -> str:
        """timm architecture without the pretrained tag."""
        return self.timm_name.split(".")[0]


BACKBONES: dict[str, BackboneSpec] = {}
ALIASES: dict[str, str] = {}


def register_backbone(spec: BackboneSpec, *aliases: str) -> BackboneSpec:
    if spec.pos_embed not in POS_EMBED_MODES:
        raise ValueError(f"unknown pos_embed mode {spec.pos_embed!r}")
    BACKBONES[spec.name] = spec
    for alias in aliases:
        ALIASES[alias] = spec.name
    return spec


def _register_defaults() -> None:
    for size, arch in (("s", "small"), ("b", "base")):
        for patch in (16, 8):
            register_backbone(BackboneSpec(
                f"dino_vit{size}{patch}", f"vit_{arch}_patch{patch}_224.dino", "dino", patch, 0,
                pos_embed="dino", description=f"DINO ViT-{size.upper()}/{patch} (Caron et al. 2021)",
            ))
    for size, arch in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant")):
        register_backbone(BackboneSpec(
            f"dinov2_vit{size}14", f"vit_{arch}_patch14_dinov2.lvd142m", "dinov2", 14, 0,
            pos_embed="dinov2", description=f"DINOv2 ViT-{size.upper()}/14, LVD-142M",
        ), *(("dinov2",) if size == "l" else ()))
        register_backbone(BackboneSpec(
            f"dinov2_vit{size}14_reg4", f"vit_{arch}_patch14_reg4_dinov2.lvd142m", "dinov2", 14,
            4, pos_embed="dinov2_reg",
            description=f"DINOv2 ViT-{size.upper()}/14 with 4 registers, LVD-142M",
        ), *(("dinov2_reg4",) if size == "l" else ()))
    register_backbone(BackboneSpec(
        "deit3_vitb16", "deit3_base_patch16_224.fb_in22k_ft_in1k", "deit3", 16, 0,
        default_feature="v", description="DeiT-III ViT-B/16, IN-22k then IN-1k",
    ))
    register_backbone(BackboneSpec(
        "openclip_vitb16", "vit_base_patch16_clip_224.laion2b", "openclip", 16, 0,
        default_feature="v", description="OpenCLIP ViT-B/16, LAION-2B (image tower)",
    ))


_register_defaults()


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def get_backbone_spec(name: str) -> BackboneSpec:
    """Resolve a short name, an alias, or ``timm:<timm model name>``."""
    if name.startswith("timm:"):
        timm_name = name[len("timm:"):]
        return _timm_passthrough_spec(name, timm_name)
    key = ALIASES.get(name, name)
    if key in BACKBONES:
        return BACKBONES[key]
    choices = list(BACKBONES) + list(ALIASES)
    close = difflib.get_close_matches(name, choices, n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(sorted(choices))}"
    raise LostregError(f"unknown model {name!r}; {hint} (or timm:<timm model name>)")


def _timm_passthrough_spec(name: str, timm_name: str) -> BackboneSpec:
    import timm

    arch = timm_name.split(".")[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models("vit*"), n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise LostregError(f"unknown timm model {timm_name!r}{hint}")
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None or not hasattr(model, "blocks"):
        raise LostregError(f"timm model {timm_name!r} is not a ViT with patch tokens")
    return BackboneSpec(
        name, timm_name, "timm", int(patch[0]), int(getattr(model, "num_reg_tokens", 0)),
        description=f"timm passthrough {timm_name}",
    )


# --- position embeddings -----------------------------------------------------------------


def resample_patch_pos_embed(pos: torch.Tensor, new_grid: tuple[int, int], mode: str) -> torch.Tensor:
    """Resample patch position embeddings ``(1, M*M, C)`` to ``new_grid`` as ``mode``'s code does.

    * ``dino``/``dinov2``: ``F.interpolate(scale_factor=((h+0.1)/M, (w+0.1)/M), bicubic)``
      without antialias (DINO v1 and the official DINOv2 hub models without registers);
    * ``dinov2_reg`` and ``timm``: by size, bicubic, antialias on (what timm does).

    At the pretrained grid every mode is the identity.
    """
    side = int(math.isqrt(pos.shape[1]))
    if side * side != pos.shape[1]:
        raise ValueError(f"position embedding of {pos.shape[1]} tokens is not a square grid")
    rows, cols = new_grid
    if (rows, cols) == (side, side):
        return pos
    dtype = pos.dtype
    grid = pos.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if mode in ("dino", "dinov2"):
        out = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side),
                            mode="bicubic", align_corners=False)
    elif mode in ("dinov2_reg", "timm"):
        out = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=True,
                            align_corners=False)
    else:
        raise ValueError(f"unknown pos_embed mode {mode!r}")
    if out.shape[-2:] != (rows, cols):
        raise RuntimeError(f"interpolated grid {tuple(out.shape[-2:])} != {(rows, cols)}")
    return out.permute(0, 2, 3, 1).reshape(1, rows * cols, -1).to(dtype)


def _pos_embed_like_original(self: Any, x: torch.Tensor, mode: str) -> torch.Tensor:
    """Replacement for timm's ``VisionTransformer._pos_embed`` using ``mode``'s interpolation.

    Same token layout as timm (class, registers, patches); only the resampling differs.
    """
    if x.ndim == 4:  # dynamic_img_size: patch_embed keeps the (B, rows, cols, C) grid
        batch, rows, cols, dim = x.shape
        x = x.reshape(batch, rows * cols, dim)
    else:  # fixed image size: (B, N, C) on the model's own grid
        batch = x.shape[0]
        rows, cols = (int(v) for v in self.patch_embed.grid_size)
    prefix = []
    if self.cls_token is not None:
        prefix.append(self.cls_token.expand(batch, -1, -1))
    if self.reg_token is not None:
        prefix.append(self.reg_token.expand(batch, -1, -1))
    pos = self.pos_embed
    if pos is None:  # nothing to resample (timm's pos_embed="none")
        return self.pos_drop(torch.cat(prefix + [x], dim=1))
    embedded_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
    patch_pos = resample_patch_pos_embed(pos[:, embedded_prefix:], (rows, cols), mode)
    if self.no_embed_class:
        x = torch.cat(prefix + [x + patch_pos], dim=1)
    else:
        x = torch.cat(prefix + [x], dim=1)
        x = x + torch.cat([pos[:, :embedded_prefix], patch_pos], dim=1)
    return self.pos_drop(x)


def install_pos_embed(model: torch.nn.Module, mode: str) -> None:
    """Make ``model`` resample position embeddings the way its original code does."""
    if mode not in POS_EMBED_MODES:
        raise ValueError(f"unknown pos_embed mode {mode!r}")
    if mode == "timm":
        return
    model._pos_embed = types.MethodType(  # type: ignore[method-assign]
        lambda self, x: _pos_embed_like_original(self, x, mode), model
    )


# --- weights -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsInfo:
    """Where the weights came from; ``sha256`` makes every number traceable to a file."""

    source: str  # "hub" | "file" | "random"
    path: str | None = None
    sha256: str | None = None
    hub_id: str | None = None

    @property
    def is_random(self) -> bool:
        return self.source == "random"

    def identity(self) -> str:
        return "random" if self.is_random else f"sha256:{self.sha256}"


@dataclass
class Backbone:
    """A ready model with what preprocessing and feature extraction need."""

    spec: BackboneSpec
    model: torch.nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: WeightsInfo
    num_prefix_tokens: int

    @property
    def patch_size(self) -> int:
        return self.spec.patch_size

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def depth(self) -> int:
        """Number of transformer blocks (valid ``--layer`` values: -depth..depth-1)."""
        return len(self.model.blocks)


def _weights_path_problem(path: Path) -> LostregError:
    """The one-line error for a ``--weights`` value that is not a readable file."""
    if path.is_dir():
        return LostregError(f"{path}: is a folder, not a weights file (.pth, .safetensors)")
    return LostregError(f"{path}: weights file not found (--weights takes hub, random or the "
                        "path of a checkpoint file)")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise _weights_path_problem(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file for the user
        if "Weights only load failed" in str(exc):
            raise LostregError(f"{path}: cannot read checkpoint: it pickles objects other than "
                               "tensors, which are refused (weights are read with "
                               "weights_only=True)") from None
        raise LostregError(f"{path}: cannot read checkpoint: not a PyTorch (torch.save) or "
                           f"safetensors weights file ({exc.__class__.__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    for key in ("teacher", "model", "state_dict", "model_state"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise LostregError(f"{path}: checkpoint is not a state dict")
    # DINO teacher checkpoints prefix keys with "backbone." (and DDP with "module.")
    for prefix in ("module.", "backbone."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Load a timm state dict or an official release file (DINO, DINOv2) into ``model``."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = _read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "dino_head."))
             or k in model.state_dict()}
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception as exc:  # noqa: BLE001
        raise LostregError(f"{path}: cannot convert checkpoint for this model ({exc})") from None
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing or result.unexpected_keys:
        raise LostregError(
            f"{path}: checkpoint does not fit the model (missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}); is it the right --model?"
        )


def resolve_hub_file(timm_name: str) -> tuple[Path, str]:
    """Download (or find in the cache) the weights file timm would load for ``timm_name``."""
    import timm
    from huggingface_hub import hf_hub_download

    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None or not cfg.hf_hub_id:
        raise LostregError(f"timm model {timm_name!r} has no Hugging Face hub weights; "
                           "use --weights PATH")
    hub_id = cfg.hf_hub_id
    candidates = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
    candidates += ["model.safetensors", "pytorch_model.bin"]
    last_error: Exception | None = None
    for filename in candidates:
        try:
            return Path(hf_hub_download(hub_id, filename)), hub_id
        except Exception as exc:  # noqa: BLE001 - try the next name, report the last failure
            last_error = exc
            if exc.__class__.__name__ not in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
                break
    first_line = str(last_error).splitlines()[0] if last_error else ""
    if len(first_line) > 200:  # hub messages run long: cut at a word
        first_line = first_line[:200].rsplit(" ", 1)[0] + " ..."
    raise LostregError(
        f"cannot get weights for {timm_name} from the Hugging Face hub ({hub_id}: "
        f"{last_error.__class__.__name__}: {first_line}); offline? download the file "
        "elsewhere and pass --weights PATH"
    )


_SHA256_MEMO: dict[tuple[str, int, int], str] = {}


def sha256_weights(path: Path) -> str:
    """sha256 of a weights file, computed once per (path, size, mtime) in a process: a run
    hashes the file to name itself before it builds the model, and a ViT-g file is 4 GB."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_MEMO:
        _SHA256_MEMO[key] = sha256_file(path)
    return _SHA256_MEMO[key]


def resolve_weights(spec: BackboneSpec, weights: str) -> tuple[WeightsInfo, Path | None]:
    """Where ``weights`` (``hub`` | a checkpoint path | ``random``) come from, hashed; the hub
    file is downloaded (or found in the cache) here."""
    if weights == "random":
        return WeightsInfo("random"), None
    if weights == "hub":
        path, hub_id = resolve_hub_file(spec.timm_name)
        return WeightsInfo("hub", str(path), sha256_weights(path), hub_id), path
    path = Path(weights).expanduser()
    if not path.is_file():
        raise _weights_path_problem(path)
    return WeightsInfo("file", str(path.resolve()), sha256_weights(path)), path


def normalisation(spec: BackboneSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std from timm's pretrained config (CLIP's for CLIP models), ImageNet's else."""
    import timm

    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    if cfg is None:
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return tuple(cfg.mean), tuple(cfg.std)


def build_model(spec: BackboneSpec, meta: bool = False) -> torch.nn.Module:
    """The timm model of ``spec`` (untrained; ``meta``: shapes only, no memory), running at
    each image's own resolution (``dynamic_img_size``)."""
    import timm

    kwargs = dict(spec.model_kwargs)
    kwargs.setdefault("dynamic_img_size", True)
    try:
        if meta and "weight_init" not in kwargs:
            try:  # shapes only: skip the weight init (a third of a cached rerun's time)
                with torch.device("meta"):
                    return timm.create_model(spec.timm_name, pretrained=False,
                                             weight_init="skip", **kwargs)
            except TypeError:  # a model without timm's weight_init switch
                pass
        with torch.device("meta") if meta else contextlib.nullcontext():
            return timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    except RuntimeError as exc:
        raise LostregError(f"cannot create timm model {spec.timm_name!r}: {exc}") from None


def create_backbone(
    name: str | BackboneSpec,
    weights: str = "hub",
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Backbone:
    """Build the model for ``name`` with ``weights`` = ``hub`` | a checkpoint path | ``random``.

    ``random`` initialises with a fixed seed: for smoke runs only, never a result.
    """
    spec = name if isinstance(name, BackboneSpec) else get_backbone_spec(name)
    info, path = resolve_weights(spec, weights)
    torch.manual_seed(seed)
    model = build_model(spec)
    if path is not None:
        load_checkpoint(model, path)
    install_pos_embed(model, spec.pos_embed)
    mean, std = normalisation(spec)
    model.eval().requires_grad_(False).to(device)
    return Backbone(spec, model, mean, std, info, int(model.num_prefix_tokens))  # type: ignore[arg-type]
