"""Where weights come from (hub, file, random), hashed, and how checkpoint files are read.

Every number must be traceable to a weights file, so each source ends in a sha256. Checkpoints
are read with ``weights_only=True``; official release formats (DINO, DINOv2, DINOv3) are
converted with timm's own checkpoint filter of the model's family.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lostreg.errors import LostregError
from lostreg.io import sha256_file

HUB_PROBE_TIMEOUT_S = 3.0
_HUB_REACHABLE: dict[str, bool] = {}


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


def _weights_path_problem(path: Path) -> LostregError:
    """The one-line error for a ``--weights`` value that is not a readable file."""
    if path.is_dir():
        return LostregError(f"{path}: is a folder, not a weights file (.pth, .safetensors)")
    return LostregError(f"{path}: weights file not found (--weights takes hub, random or the "
                        "path of a checkpoint file)")


def _checkpoint_format(path: Path) -> str:
    """``zip`` (torch.save), ``pickle`` (legacy torch.save) or ``safetensors``, judged from the
    first bytes; a one-line ``LostregError`` saying what the file is otherwise."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30:
        return "safetensors"
    if not head:
        problem = "the file is empty"
    elif b"\x00" not in head and _is_utf8(head):
        first = head.decode("utf-8").strip().splitlines()
        problem = (f"it is a text file (starts {first[0][:40]!r})" if first
                   else "it is a text file of blanks")
    else:
        problem = "its first bytes are not a torch.save archive, a pickle or a safetensors header"
    raise LostregError(f"{path}: cannot read checkpoint: not a PyTorch (torch.save) or "
                       f"safetensors weights file: {problem}")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:  # a multi-byte character cut at the end of the sample
        return exc.start >= len(data) - 3
    return True


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise _weights_path_problem(path)
    kind = _checkpoint_format(path)
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file for the user
        if "Weights only load failed" in str(exc):
            raise LostregError(f"{path}: cannot read checkpoint: it pickles objects other than "
                               "tensors, which are refused (weights are read with "
                               "weights_only=True)") from None
        raise LostregError(f"{path}: cannot read checkpoint: damaged or not a weights file "
                           f"({exc.__class__.__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    for key in ("teacher", "model", "state_dict", "model_state"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LostregError(f"{path}: checkpoint is not a state dict (name -> tensor)")
    # DINO teacher checkpoints prefix keys with "backbone." (and DDP with "module.")
    for prefix in ("module.", "backbone."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _check_dropped_qkv_bias(state: dict[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    """An official DINOv3 file carries ``qkv.bias``; timm's model without q/v biases drops it
    (their distilled models have all-zero biases). Refuse to drop a bias that is not zero."""
    if getattr(model.blocks[0].attn, "q_bias", None) is not None:
        return
    for key, value in state.items():
        if key.endswith("attn.qkv.bias"):
            mask = state.get(key.replace("qkv.bias", "qkv.bias_mask"))
            bias = value * mask if mask is not None else value
            if bool(bias.ne(0).any()):
                raise LostregError(
                    f"{path}: {key} is not zero but this model has no q/v bias; use the _qkvb "
                    "variant (e.g. --model timm:vit_small_patch16_dinov3_qkvb)")


# Non-floating tensors a release file may carry as bookkeeping, never as weights (a BatchNorm
# counter in a DINO head, DINOv3's q/k/v bias mask, which timm's filter drops).
_NON_FLOAT_ALLOWED = ("num_batches_tracked", "bias_mask")


def _check_dtypes(state: dict[str, torch.Tensor], path: Path) -> None:
    """Weights are floating point. An integer, bool or complex tensor would be cast silently
    by ``load_state_dict`` (an int32 copy of a float weight loses its fractions, a bool one is
    0/1) and give a real-looking run, so refuse it, naming the tensor."""
    for key, value in state.items():
        if not (value.is_floating_point() or key.endswith(_NON_FLOAT_ALLOWED)):
            raise LostregError(f"{path}: tensor {key} has dtype {str(value.dtype).removeprefix('torch.')}"
                               "; weights must be floating point (float32, float16, bfloat16), "
                               "and a cast would change them")


def model_name(model: nn.Module) -> str:
    """The model as a message names it: timm architecture (and tag), depth and width, which is
    what tells ViT-S weights from ViT-Ti ones."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") or model.__class__.__name__
    if cfg.get("tag"):
        name += f".{cfg['tag']}"
    blocks, width = getattr(model, "blocks", None), getattr(model, "embed_dim", None)
    return f"{name} ({len(blocks)} blocks, width {width})" if blocks is not None else name


def _check_shapes(state: dict[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    """One line naming the first tensor (in the model's order) whose shape differs, with both
    shapes and the model, instead of ``load_state_dict``'s list of ``size mismatch`` lines."""
    for key, expected in model.state_dict().items():
        found = state.get(key)
        if found is not None and found.shape != expected.shape:
            raise LostregError(
                f"{path}: checkpoint does not fit the model: {key} has shape "
                f"{list(found.shape)} in the checkpoint but {list(expected.shape)} in "
                f"{model_name(model)}; is it the right --model?")


def load_checkpoint(model: nn.Module, path: Path, family=None) -> dict[str, torch.Tensor]:
    """Load a timm state dict or an official release file (DINO, DINOv2, DINOv3) into
    ``model``; returns the raw state as read (for release-specific buffers).

    Every tensor is checked before anything is loaded: dtypes on the file as read (a release
    filter's arithmetic would hide an integer tensor), shapes after the family's filter."""
    from lostreg.backbones.families import family_of

    family = family or family_of(model)
    raw = _read_state_dict(path)
    model_keys = model.state_dict().keys()
    state = {k: v for k, v in raw.items() if not k.startswith(("head.", "dino_head."))
             or k in model_keys}
    _check_dtypes(state, path)
    if "storage_tokens" in raw:
        _check_dropped_qkv_bias(raw, model, path)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # timm's filter prints what it drops
            state = family.checkpoint_filter()(state, model)
    except Exception as exc:  # noqa: BLE001
        raise LostregError(f"{path}: cannot convert checkpoint for this model ({exc})") from None
    _check_shapes(state, model, path)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing or result.unexpected_keys:
        raise LostregError(
            f"{path}: checkpoint does not fit the model (missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}); is it the right --model?"
        )
    return raw


# --- the Hugging Face hub --------------------------------------------------------------------


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One TCP connection to the hub's host, with a short timeout, once per process: offline
    machines then fail in seconds instead of after huggingface_hub's retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = constants.ENDPOINT
    if endpoint not in _HUB_REACHABLE:
        url = urllib.parse.urlparse(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname or "", port), timeout=timeout).close()
            _HUB_REACHABLE[endpoint] = True
        except OSError:
            _HUB_REACHABLE[endpoint] = False
    return _HUB_REACHABLE[endpoint]


def hub_cache_folder(hub_id: str) -> Path:
    """Where huggingface_hub keeps ``hub_id``'s files (``HF_HUB_CACHE``/models--org--name)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + hub_id.replace("/", "--"))


def _hub_error(timm_name: str, hub_id: str, filename: str, online: bool,
               error: Exception | None) -> LostregError:
    cache = hub_cache_folder(hub_id)
    url = f"https://huggingface.co/{hub_id}/resolve/main/{filename}"
    if not online:
        return LostregError(
            f"weights for {timm_name} are not in the Hugging Face cache and the hub is not "
            f"reachable (offline?): download {url} (repository {hub_id}, file {filename}) and "
            f"pass --weights PATH, or fill the cache {cache} on a machine with internet "
            f"(huggingface-cli download {hub_id} {filename}) and copy that folder here")
    if error is not None and "Gated" in error.__class__.__name__:
        return LostregError(
            f"weights for {timm_name} are gated on the Hugging Face hub (repository {hub_id}): "
            f"accept the licence at https://huggingface.co/{hub_id} and log in "
            "(huggingface-cli login), or pass the official release file with --weights PATH")
    first = str(error).splitlines()[0] if error is not None and str(error) else ""
    if len(first) > 160:  # hub messages run long: cut at a word
        first = first[:160].rsplit(" ", 1)[0] + " ..."
    return LostregError(
        f"cannot get weights for {timm_name} from the Hugging Face hub (repository {hub_id}, "
        f"file {filename}: {error.__class__.__name__}: {first}); download {url} and pass "
        f"--weights PATH (the hub cache is {cache})")


def resolve_hub_file(timm_name: str) -> tuple[Path, str]:
    """Download (or find in the cache) the weights file timm would load for ``timm_name``.

    The hub is probed once with a short timeout; when it is unreachable only the local cache
    is consulted (``HF_HUB_OFFLINE`` behaviour), and the error names the exact file."""
    import timm
    from huggingface_hub import hf_hub_download

    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None or not cfg.hf_hub_id:
        raise LostregError(f"timm model {timm_name!r} has no Hugging Face hub weights; "
                           "use --weights PATH")
    hub_id = cfg.hf_hub_id
    candidates = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
    candidates += [name for name in ("model.safetensors", "pytorch_model.bin") if name not in candidates]
    online = hub_reachable()
    last_error: Exception | None = None
    for filename in candidates:
        try:
            return Path(hf_hub_download(hub_id, filename, local_files_only=not online)), hub_id
        except Exception as exc:  # noqa: BLE001 - try the next name, report the first file
            last_error = exc
            if online and exc.__class__.__name__ not in ("EntryNotFoundError",
                                                         "RemoteEntryNotFoundError"):
                break
    raise _hub_error(timm_name, hub_id, candidates[0], online, last_error)


# --- hashing and resolution ----------------------------------------------------------------


_SHA256_MEMO: dict[tuple[str, int, int], str] = {}


def sha256_weights(path: Path) -> str:
    """sha256 of a weights file, computed once per (path, size, mtime) in a process: a run
    hashes the file to name itself before it builds the model, and a ViT-g file is 4 GB."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_MEMO:
        _SHA256_MEMO[key] = sha256_file(path)
    return _SHA256_MEMO[key]


def resolve_weights(spec, weights: str) -> tuple[WeightsInfo, Path | None]:
    """Where ``weights`` (``hub`` | a checkpoint path | ``random``) come from, hashed; the hub
    file is downloaded (or found in the cache) here."""
    if weights == "random":
        return WeightsInfo("random"), None
    if weights == "hub":
        path, hub_id = resolve_hub_file(spec.timm_name)
        return WeightsInfo("hub", str(path), sha256_weights(path), hub_id), path
    path = Path(os.path.expanduser(weights))
    if not path.is_file():
        raise _weights_path_problem(path)
    return WeightsInfo("file", str(path.resolve()), sha256_weights(path)), path


def normalisation(spec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std from timm's pretrained config (CLIP's for CLIP models), ImageNet's else."""
    import timm

    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    if cfg is None:
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return tuple(cfg.mean), tuple(cfg.std)
