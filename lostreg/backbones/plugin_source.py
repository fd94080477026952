"""Building a plug-in model: from a ``py:`` name or an object to a ready ``Backbone``.

``--model py:package.module:factory`` imports ``package.module`` (it must be importable: on
``PYTHONPATH``, or the current folder under ``python -m``) and ``--model
py:path/to/file.py:factory`` runs the file; ``factory()`` is then called with no arguments,
after ``torch.manual_seed(0)`` (so a randomly initialised model is the same on every call), and
returns an ``nn.Module``, a function of the protocol or a ``UserModel``
(:mod:`lostreg.backbones.plugin`). ``--weights`` means, for a plug-in model: ``hub`` (the
default) the weights the module holds as the factory made them; ``PATH`` a checkpoint loaded
into it (``weights_only=True``, every tensor's dtype and shape checked, strictly: no key
missing or left over); ``random`` says its weights are random (a smoke run, never a result).
Anything that fails (the import, the factory, a probe batch of the wrong shape) is one line
naming the model and saying what was expected.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from lostreg.backbones.build import Backbone
from lostreg.backbones.plugin import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OWN_KIND,
    OwnFeaturesBackbone,
    Plugin,
    UserModel,
    UsualLayoutFamily,
    adapter_of,
    check_name,
    check_usual_layout,
    checked_features,
    forward_features_fn,
    probe_images,
    qualified_name,
    registered_family,
    source_sha256,
    state_sha256,
    timm_architecture,
)
from lostreg.backbones.registry import BackboneSpec, register_name_prefix
from lostreg.backbones.weights import (
    WeightsInfo,
    _check_dtypes,
    _check_shapes,
    _read_state_dict,
    load_checkpoint,
    resolve_weights,
)
from lostreg.errors import LostregError
from lostreg.io import sha256_file

# --- what the user gave ------------------------------------------------------------------------


def _modules_of(user: UserModel, adapter: str, label: str) -> list[nn.Module]:
    """The modules whose state is the model's weights: the module itself; for a function, its
    ``weights_of`` (or the module of a bound method). A function whose weights lostreg cannot
    see is refused: its runs could not be told apart from another model's."""
    if isinstance(user.model, nn.Module):
        return [user.model]
    given = user.weights_of
    if given is None and isinstance(getattr(user.model, "__self__", None), nn.Module):
        given = user.model.__self__  # type: ignore[union-attr]
    if given is None:
        raise LostregError(
            f"{label}: lostreg cannot see the weights a plain function runs; pass "
            "weights_of=<the nn.Module(s) it calls> (their state enters the run's identity, so two "
            "different models never share a run folder; weights_of=() for a model without any)")
    modules = [given] if isinstance(given, nn.Module) else list(given)
    if not all(isinstance(m, nn.Module) for m in modules):
        raise LostregError(f"{label}: weights_of must be nn.Module(s)")
    return modules


def _patch_size(user: UserModel, adapter: str, label: str) -> int:
    """The patch size: given, else the module's ``patch_embed.patch_size`` or ``patch_size``."""
    value: Any = user.patch_size
    if value is None and isinstance(user.model, nn.Module):
        value = getattr(getattr(user.model, "patch_embed", None), "patch_size", None)
        if value is None:
            value = getattr(user.model, "patch_size", None)
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise LostregError(f"{label}: patches {tuple(value)} are not square")
        value = value[0]
    if value is None:
        raise LostregError(f"{label}: say its patch size (patch_size=...): lostreg pads each image "
                           "to a multiple of it and reads one feature per patch")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LostregError(f"{label}: patch_size {value!r}: expected a whole number >= 1")
    return value


def _triple(values: Sequence[float], what: str, label: str) -> tuple[float, float, float]:
    try:
        triple = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise LostregError(f"{label}: {what} {values!r}: expected 3 numbers (R, G, B)") from None
    if len(triple) != 3 or not all(v == v and abs(v) != float("inf") for v in triple):
        raise LostregError(f"{label}: {what} {values!r}: expected 3 finite numbers (R, G, B)")
    if what == "std" and min(triple) <= 0:
        raise LostregError(f"{label}: std {values!r}: every value must be positive")
    return triple  # type: ignore[return-value]


def _normalisation(user: UserModel, label: str) -> tuple[tuple[float, float, float], ...]:
    """Mean and std: given, else a timm module's pretrained config, else ImageNet's."""
    cfg = getattr(user.model, "pretrained_cfg", None) or {}
    mean = user.mean if user.mean is not None else cfg.get("mean", IMAGENET_MEAN)
    std = user.std if user.std is not None else cfg.get("std", IMAGENET_STD)
    return _triple(mean, "mean", label), _triple(std, "std", label)


def _place(modules: list[nn.Module], device: torch.device, owned: bool, label: str) -> None:
    """A module lostreg made (``owned``: a factory's) goes to ``device`` in eval mode; a
    user's module is never moved (it may be the one being trained), so it must be there."""
    if owned:
        for module in modules:
            module.to(device).eval().requires_grad_(False)
        return
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.device != device and not (tensor.device.type == device.type == "cuda"
                                                and device.index is None):
                raise LostregError(f"{label}: the module is on {tensor.device} but the run is on "
                                   f"{device}; pass device='{tensor.device}' (or move it)")
            break


# --- weights -----------------------------------------------------------------------------------


def _load_file(model: nn.Module, path: Path, adapter: str, label: str) -> None:
    """A checkpoint into the module: a timm module through its family's loader (official
    release formats too), any other strictly by name after the dtype and shape checks."""
    if adapter == "family":
        load_checkpoint(model, path)
        return
    state = _read_state_dict(path)
    _check_dtypes(state, path)
    _check_shapes(state, model, path)
    expected = model.state_dict().keys()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the model has not"
        more = len(missing) + len(extra) - 1
        raise LostregError(f"{path}: checkpoint does not fit {label}: it {what}"
                           + (f" (and {more} more differences)" if more else ""))
    model.load_state_dict(state, strict=True)


def _weights(user: UserModel, modules: list[nn.Module], adapter: str, weights: str,
             label: str) -> tuple[Any, str]:
    """Load ``weights`` (``hub``: as the module is; ``random``: as it is, declared random;
    ``PATH``: a checkpoint into it) and return the ``WeightsInfo`` and the state's sha256."""
    if weights not in ("hub", "random"):
        if not isinstance(user.model, nn.Module):
            raise LostregError(f"{label}: --weights {weights}: a plain function has no module to "
                               "load a checkpoint into; load it yourself")
        info, path = resolve_weights(None, weights)
        _load_file(user.model, path, adapter, label)  # type: ignore[arg-type]
    state = state_sha256(modules)
    if weights == "random":
        return WeightsInfo("random", sha256=state), state
    if weights == "hub":
        return WeightsInfo("module", sha256=state), state
    return info, state


# --- adapters ----------------------------------------------------------------------------------


def _probe(run: Callable[[], Any], label: str, patch: int) -> Any:
    """Run the model on the probe batch; a failure is one line."""
    try:
        return run()
    except LostregError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the user's code is one line
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise LostregError(
            f"{label}: failed on a probe batch of one {2 * patch}x{3 * patch} image "
            f"({type(exc).__name__}: {text}); lostreg runs every image at its own size, padded "
            f"to a multiple of the patch size {patch}, so the model must take any such size"
        ) from None


def _prefix(given: int | None, model: Any, tokens: int, patches: int, label: str) -> int:
    """Tokens before the patches: given, else the module's ``num_prefix_tokens``, else what
    the probe batch had beyond its patches; checked against the probe's token count."""
    prefix = given if given is not None else getattr(model, "num_prefix_tokens", None)
    if prefix is None:
        prefix = tokens - patches
    if isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0 \
            or tokens != prefix + patches:
        raise LostregError(
            f"{label}: {tokens} tokens for a probe image of 2x3 = {patches} patches; expected "
            f"num_prefix_tokens ({prefix!r}: class and register tokens) + {patches}")
    return prefix


def _registers(user: UserModel, model: Any, prefix: int, reader: Any) -> int:
    """Register tokens, for the leaderboard: given, else what the model's family counts, else
    the prefix tokens beyond its class token."""
    if user.num_registers is not None:
        return int(user.num_registers)
    if not isinstance(model, nn.Module):
        return 0
    count = (reader or UsualLayoutFamily()).num_registers(model)
    if count == 0:
        count = max(0, prefix - (1 if getattr(model, "cls_token", None) is not None else 0))
    return count


def _class_sha256(cls: type | None) -> str | None:
    """The sha256 of the file defining the module's class; None for none, or for a timm class
    (named by its qualified name and architecture, as named backbones by their timm name)."""
    if cls is None or cls.__module__.split(".")[0] == "timm":
        return None
    return source_sha256(cls)


def _adapt(user: UserModel, adapter: str, patch: int, device: torch.device,
           label: str) -> tuple[nn.Module, int, dict[str, Any]]:
    """The model as lostreg runs it, its prefix-token count, and what the Backbone needs."""
    model = user.model
    images = probe_images(patch, device, torch.float32)
    if adapter == "family":
        family = registered_family(model, label)  # type: ignore[arg-type]
        return model, family.num_prefix_tokens(model), {}  # type: ignore[union-attr,arg-type]
    if adapter == "qkv":
        tokens = _probe(lambda: check_usual_layout(model, images, label), label, patch)  # type: ignore[arg-type]
        prefix = _prefix(user.num_prefix_tokens, model, tokens, 6, label)
        return model, prefix, {"reader": UsualLayoutFamily(prefix)}  # type: ignore[return-value]
    if adapter == "forward_features":
        with torch.inference_mode():
            raw = _probe(lambda: model.forward_features(images), label, patch)  # type: ignore[union-attr]
        prefix = 0
        if isinstance(raw, torch.Tensor) and raw.ndim == 3:
            prefix = _prefix(user.num_prefix_tokens, model, raw.shape[1], 6, label)
        compute = forward_features_fn(model, prefix)  # type: ignore[arg-type]
    else:
        compute = lambda batch: model(batch, patch)  # noqa: E731 - the protocol's call
        prefix = 0
    with torch.inference_mode():
        out = checked_features(_probe(lambda: compute(images), label, patch), images, patch, label)
    return (model if isinstance(model, nn.Module) else nn.ModuleList(_modules_of(user, adapter,
                                                                                   label)),
            prefix, {"compute": compute, "provides_attn": out.attn is not None})


def build_plugin(user: UserModel, *, name: str, source: str, source_sha: str | None,
                 weights: str, device: torch.device, owned: bool,
                 loader: Callable | None = None) -> Backbone:
    """A ready ``Backbone`` for the user's model (``owned``: made by a factory here, so it may
    be moved and put in eval mode; otherwise the caller holds it in eval mode)."""
    adapter = adapter_of(user.model, name)
    modules = _modules_of(user, adapter, name)
    patch = _patch_size(user, adapter, name)
    mean, std = _normalisation(user, name)
    _place(modules, device, owned, name)
    info, state = _weights(user, modules, adapter, weights, name)
    model, prefix, extra = _adapt(user, adapter, patch, device, name)
    own = adapter in ("forward_features", "callable")
    cls = type(user.model) if isinstance(user.model, nn.Module) else None
    plugin = Plugin(
        source=source, source_sha256=source_sha,
        model_class=qualified_name(cls) if cls is not None else None,
        class_sha256=_class_sha256(cls),
        architecture=timm_architecture(user.model),
        adapter=adapter, state_sha256=state, patch_size=patch, num_prefix_tokens=prefix,
        mean=mean, std=std, build=loader)
    spec = BackboneSpec(
        name, f"plugin:{qualified_name(cls if cls is not None else user.model)}", "plugin",
        patch, _registers(user, user.model, prefix, extra.get("reader") or (
            registered_family(user.model, name) if adapter == "family" else None)),
        default_feature=OWN_KIND if own else "k",
        description=f"plug-in model ({adapter} adapter) from {source}", plugin=plugin)
    if own:
        return OwnFeaturesBackbone(spec, model, mean, std, info, prefix, **extra)
    return Backbone(spec, model, mean, std, info, prefix, **extra)


# --- py: names ---------------------------------------------------------------------------------


def parse_plugin_name(name: str) -> tuple[str, str]:
    """``py:package.module:factory`` or ``py:path/to/file.py:factory`` -> (target, factory)."""
    target, sep, factory = name[len("py:"):].rpartition(":")
    if not sep or not target or not factory.isidentifier():
        raise LostregError(f"--model {name}: expected py:package.module:factory or "
                           "py:path/to/file.py:factory")
    return target, factory


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def import_target(name: str, target: str) -> tuple[ModuleType, str | None]:
    """The module a ``py:`` name points at and the sha256 of its file (one line on failure)."""
    if _is_file_target(target):
        path = Path(target).expanduser()
        if not path.is_file():
            raise LostregError(f"--model {name}: {path}: file not found")
        digest = sha256_file(path)
        module_name = f"lostreg_plugin_{digest[:16]}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise LostregError(f"--model {name}: {path}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look classes up there
        loaded: Callable[[], Any] = lambda: spec.loader.exec_module(module)  # type: ignore[union-attr]  # noqa: E731
    else:
        digest = None
        loaded = lambda: importlib.import_module(target)  # noqa: E731
    try:
        result = loaded()
    except Exception as exc:  # noqa: BLE001 - the user's import is one line
        if _is_file_target(target):
            sys.modules.pop(module_name, None)
        text = str(exc).splitlines()[0] if str(exc) else ""
        hint = "; is it on PYTHONPATH?" if isinstance(exc, ModuleNotFoundError) else ""
        raise LostregError(f"--model {name}: cannot import {target} ({type(exc).__name__}: "
                           f"{text}){hint}") from None
    module = module if _is_file_target(target) else result
    return module, digest or source_sha256(module)


def _made(name: str, factory: Callable[[], Any], factory_name: str) -> UserModel:
    """Call the factory (seeded), one line when it fails or returns something unusable.

    timm is imported first, whole: the run imports it in a background thread
    (``pipeline.warm_start``), and a factory importing one of its submodules (or torchvision's)
    at the same moment can meet a partially initialised module; a top-level import waits for
    the other thread's instead."""
    import timm  # noqa: F401

    torch.manual_seed(0)
    try:
        made = factory()
    except LostregError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's factory is one line
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise LostregError(f"--model {name}: the factory {factory_name}() failed "
                           f"({type(exc).__name__}: {text})") from None
    if isinstance(made, UserModel):
        return made
    if made is None or not callable(made):
        raise LostregError(f"--model {name}: the factory {factory_name}() returned "
                           f"{type(made).__name__}; expected an nn.Module, a function (images, "
                           "patch_size) -> features, or lostreg.UserModel(...)")
    return UserModel(made)


def plugin_spec(name: str) -> BackboneSpec:
    """The spec of a ``py:`` model: the module imported and the factory found now (a typo
    fails at once); the factory runs when the model is built (``Plugin.build``)."""
    target, factory_name = parse_plugin_name(name)
    module, digest = import_target(name, target)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise LostregError(f"--model {name}: {target} has no function {factory_name!r}"
                           + (f" (it defines {', '.join(found[:8])})" if found else ""))

    def build(spec: BackboneSpec, weights: str, device: torch.device) -> Backbone:
        if spec.pos_interp != "original":
            raise LostregError(f"--pos-interp {spec.pos_interp}: a plug-in model runs as its own "
                               "code does; there is nothing for lostreg to resample")
        user = _made(name, factory, factory_name)
        model_name = check_name(user.name) if user.name else name
        return build_plugin(user, name=model_name, source=name, source_sha=digest,
                            weights=weights, device=device, owned=True, loader=build)

    return BackboneSpec(name, f"plugin:{name}", "plugin", 1, 0,
                        description=f"plug-in model {name}",
                        plugin=Plugin(source=name, source_sha256=digest, build=build))


register_name_prefix("py:", plugin_spec)  # ``--model py:...`` resolves through the registry
