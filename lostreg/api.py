"""The Python API: ``lostreg.evaluate(backbone, dataset="voc07", method="lost", ...)``.

One call runs exactly what ``python -m lostreg.run`` runs (the same ``RunConfig`` and
``lostreg.runs.grid.run_grid``: batching, feature cache, run folders, resume, provenance), for a
named backbone or for **your own model** (an ``nn.Module``, a function of the plug-in protocol,
or a ``UserModel``: see :mod:`lostreg.backbones.plugin`). Every ``lostreg.run`` flag is a keyword
of the same name and default (``--no-hard`` is ``no_hard=False``, a method's ``--tau`` is
``tau=...``); a comma-list flag takes a value, a comma string or a sequence.

Your module is never moved, and is put in eval mode only while it runs (its train/eval state
is restored afterwards, as are the TF32 switches lostreg turns off), so ``evaluate`` can be
called from a training loop every N steps: ``limit=`` scores the first N images in dataset
order (always the same images), and ``scratch=True`` marks the runs as looks during training
(``scratch-`` folders that the leaderboard never reads).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lostreg.backbones.plugin import (
    OwnFeaturesBackbone,
    UserModel,
    check_name,
    qualified_name,
    safe_name,
    timm_architecture,
)
from lostreg.backbones.plugin_source import build_plugin, source_sha256
from lostreg.errors import LostregError, did_you_mean
from lostreg.features.cache import DEFAULT_CACHE_DIR
from lostreg.features.pipeline import resolve_device
from lostreg.io import read_json_object
from lostreg.methods import METHODS
from lostreg.runs.checks import feature_request
from lostreg.runs.config import DEFAULT_MAX_PIXELS, RunConfig
from lostreg.runs.folder import RunResult
from lostreg.runs.grid import expand_sweep, run_grid

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_MODEL = "dinov2_reg4"  # lostreg.run's --model default
METRIC_COLUMNS = ("corloc", "n_hits", "n_images")
MASK_COLUMNS = ("acc", "iou", "max_f")  # saliency runs' figures (TokenCut's definition)


@dataclass
class EvaluationResult:
    """What ``evaluate`` did: one ``RunResult`` per run (``runs``), their folders
    (``run_dirs``) and their figures as a DataFrame (``metrics``, one row per run)."""

    runs: list[RunResult]

    @property
    def run_dirs(self) -> list[Path]:
        return [run.run_dir for run in self.runs]

    @property
    def corloc(self) -> float:
        """CorLoc in percent of the one run (several runs: read ``metrics``)."""
        if len(self.runs) != 1:
            raise LostregError(f"{len(self.runs)} runs: read result.metrics['corloc']")
        return self.runs[0].corloc

    @property
    def metrics(self) -> pd.DataFrame:
        """One row per run: its settings (model, dataset, method and its parameters, feature,
        layer, normalisation, precision, limit), its figures, smoke/scratch and its folder,
        read back from each run's ``metrics.json``."""
        import pandas as pd

        return pd.DataFrame([_row(run) for run in self.runs])

    def __str__(self) -> str:
        return "\n".join(run.summary for run in self.runs)


def _row(run: RunResult) -> dict[str, Any]:
    written = read_json_object(run.run_dir / "metrics.json")
    row: dict[str, Any] = {"run_id": run.run_id}
    for key in ("model", "dataset", "split", "method", "feature", "layer", "normalize",
                "precision"):
        row[key] = written.get(key)
    row.update(written.get("method_params") or {})
    row.update({key: run.metrics.get(key) for key in METRIC_COLUMNS})
    row["corloc"] = run.corloc
    row.update({key: run.metrics[key] for key in MASK_COLUMNS if key in run.metrics})
    config = read_json_object(run.run_dir / "config.json")
    row["limit"] = (config.get("identity") or {}).get("limit")
    row.update({"smoke": run.smoke, "scratch": bool(written.get("scratch_run")),
                "status": run.status, "run_dir": str(run.run_dir)})
    return row


# --- options as lostreg.run reads them -------------------------------------------------------


def _listed(value: Any) -> list[Any] | None:
    """A comma-list option: None, a value, a comma string or a sequence -> a list (or None)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [part.strip() for part in value.split(",")]
    if isinstance(value, Sequence):
        return list(value)
    return [value]


def _method_values(values: dict[str, Any]) -> dict[str, list[Any]]:
    """Method parameters given as keywords (``tau=0.3``, ``binary_graph=False``), each a list;
    an unknown keyword is one line naming the close ones."""
    known = {p.name for spec in METHODS.values() for p in spec.params}
    out: dict[str, list[Any]] = {}
    for name, value in values.items():
        if name not in known:
            keywords = sorted(known) + sorted(set(_DEFAULTS) - {"method_values"})
            raise LostregError(f"evaluate(): unknown keyword {name!r}; "
                               + did_you_mean(name, keywords))
        if value is not None:
            out[name] = _listed(value) if not isinstance(value, bool) else [value]  # type: ignore[assignment]
    return out


def plan(backbone: Any = None, **options: Any) -> tuple[RunConfig, dict[str, Any]]:
    """The base ``RunConfig`` and ``run_grid`` keywords ``evaluate`` runs for a named model
    (or, for your own model, the name its runs will carry), from ``evaluate``'s keywords
    (method parameters among them); the same as ``lostreg.run``'s for the matching command
    line (tests hold the two together)."""
    o = dict(_DEFAULTS, **{k: v for k, v in options.items() if k in _DEFAULTS})
    o["method_values"] = {**o["method_values"],
                          **{k: v for k, v in options.items() if k not in _DEFAULTS}}
    methods = _listed(o["methods"]) or _listed(o["method"])
    models = _listed(backbone) if backbone is not None else None
    datasets = _listed(o["dataset"])
    cache = o["cache_features"]
    workers = None if o["num_workers"] in (None, "auto") else int(o["num_workers"])
    base = RunConfig(
        model=(models or [DEFAULT_MODEL])[0], dataset=(datasets or ["voc07"])[0],
        data_root=Path(o["data_root"]) if o["data_root"] is not None else None,
        weights=str(o["weights"]), features=(_listed(o["features"]) or [None])[0],
        no_hard=bool(o["no_hard"]), device=str(o["device"]), batch_size=int(o["batch_size"]),
        limit=int(o["limit"]) if o["limit"] is not None else None, output=Path(o["output"]),
        precision=o["precision"],
        download=not o["no_download"], num_workers=workers, progress=not o["no_progress"],
        cache_features=Path(DEFAULT_CACHE_DIR) if cache is True else (
            Path(cache) if cache not in (None, False) else None),
        cache_dtype=o["cache_dtype"], allow_partial_dataset=bool(o["allow_partial_dataset"]),
        method=(methods or ["lost"])[0], wait=bool(o["wait"]), max_pixels=int(o["max_pixels"]),
        pos_interp=(_listed(o["pos_interp"]) or ["original"])[0],
        ttr_neurons=Path(o["ttr_neurons"]) if o["ttr_neurons"] is not None else None,
        scratch=bool(o["scratch"]), refine=(_listed(o["refine"]) or ["none"])[0],
        max_nonfinite=int(o["max_nonfinite"]), allow_version_mix=bool(o["allow_version_mix"]))
    values = _method_values(o["method_values"])
    if o["methods"] is not None and o["method"] is not None:
        raise LostregError("evaluate(): give method= or methods=, not both")
    for name in ("k_patches", "gram_bias"):
        if o[name] is not None:
            values[name] = _listed(o[name])  # type: ignore[assignment]
    if "k_patches" in values:
        base = dataclasses.replace(base, k_patches=int(values["k_patches"][0]))
    if "gram_bias" in values:
        base = dataclasses.replace(base, gram_bias=float(values["gram_bias"][0]))
    grid = dict(models=models, datasets=datasets, methods=methods,
                features=_listed(o["features"]), layers=_listed(o["layer"]),
                normalizations=_listed(o["normalize"]), pos_interps=_listed(o["pos_interp"]),
                refines=_listed(o["refine"]),
                k_patches=values.pop("k_patches", None), gram_biases=values.pop("gram_bias", None),
                method_values=values)
    return base, _with_suite(grid, o["suite"], models, datasets)


def _with_suite(grid: dict[str, Any], suite: str | None, models: Any, datasets: Any
                ) -> dict[str, Any]:
    """``suite=`` as ``--suite``: its pairs (and methods) instead of models and datasets."""
    if suite is None:
        return grid
    from lostreg.runs.suites import get_suite

    if models or datasets:
        raise LostregError(f"suite={suite!r} chooses the models and datasets; drop backbone and "
                           "dataset")
    chosen = get_suite(suite)
    grid.update(models=None, datasets=None,
                pairs=[(str(m), str(d)) for m, d in chosen.pairs])
    if chosen.methods is not None:
        if grid["methods"]:
            raise LostregError(f"suite={suite!r} chooses the methods; drop method")
        grid["methods"] = [m for m in chosen.methods if m in METHODS]
        grid["method_values"] = {**chosen.method_values, **grid["method_values"]}
    if chosen.refine and not grid["refines"]:
        grid["refine_by_method"] = {m: list(v) for m, v in chosen.refine.items()}
    return grid


_DEFAULTS: dict[str, Any] = dict(
    dataset=None, method=None, methods=None, features=None, layer=None, normalize=None,
    k_patches=None, gram_bias=None, pos_interp=None, ttr_neurons=None, refine=None, weights="hub",
    data_root=None, no_hard=False, precision="fp32", limit=None, output="results/runs",
    cache_features=None, cache_dtype="auto", no_download=False, max_pixels=DEFAULT_MAX_PIXELS,
    wait=False, allow_partial_dataset=False, device="auto", batch_size=16, num_workers=None,
    no_progress=False, suite=None, scratch=False, max_nonfinite=0, allow_version_mix=False,
    method_values={})


# --- the call ----------------------------------------------------------------------------------


def evaluate(
    backbone: Any = None, dataset: str | Sequence[str] | None = None,
    method: str | Sequence[str] | None = None, *, methods: Sequence[str] | None = None,
    features: Any = None, layer: Any = None, normalize: Any = None, k_patches: Any = None,
    gram_bias: Any = None, pos_interp: Any = None, ttr_neurons: str | Path | None = None,
    refine: Any = None,
    weights: str = "hub", data_root: str | Path | None = None, no_hard: bool = False,
    precision: str = "fp32", limit: int | None = None, output: str | Path = "results/runs",
    cache_features: bool | str | Path | None = None, cache_dtype: str = "auto",
    no_download: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS, wait: bool = False,
    allow_partial_dataset: bool = False, device: str = "auto", batch_size: int = 16,
    num_workers: int | str | None = None, no_progress: bool = False, suite: str | None = None,
    scratch: bool = False, max_nonfinite: int = 0, allow_version_mix: bool = False,
    patch_size: int | None = None, mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None, num_prefix_tokens: int | None = None,
    num_registers: int | None = None, name: str | None = None,
    weights_of: nn.Module | Sequence[nn.Module] | None = None, **method_values: Any,
) -> EvaluationResult:
    """Score ``backbone`` on ``dataset`` with ``method`` exactly as ``lostreg.run`` does.

    ``backbone``: a named model (``"dinov2_vits14_reg4"``, ``"timm:..."``, ``"py:pkg.mod:f"``,
    a comma string or a list: ``--model``), your ``nn.Module``, a function
    ``(images, patch_size) -> (B, N, D)`` or a ``UserModel``. Every other ``lostreg.run`` flag
    is the keyword of the same name and default (None: the flag's default, e.g. ``voc07``,
    ``lost``, the last block); method parameters too (``k_patches=50``, ``tau=0.3``,
    ``binary_graph=False``); ``methods=`` is ``method=`` as a list. ``scratch=True`` marks
    the runs as looks during training (never on the leaderboard). For your own model:
    ``patch_size``, ``mean``/``std`` (default ImageNet's, or a timm module's own),
    ``num_prefix_tokens``, ``num_registers``, ``name`` (in run ids) and ``weights_of`` (the
    modules a function runs) say what lostreg cannot read off it, and ``weights="hub"`` (the
    default) means the weights it holds. Returns an ``EvaluationResult``; bad input raises a
    one-line ``LostregError``.
    """
    options = {key: value for key, value in locals().items() if key in _DEFAULTS}
    options["method_values"] = method_values
    plugin = dict(patch_size=patch_size, mean=mean, std=std, num_prefix_tokens=num_prefix_tokens,
                  num_registers=num_registers, name=name, weights_of=weights_of)
    if isinstance(backbone, str) or backbone is None or _all_names(backbone):
        given = [key for key, value in plugin.items() if value is not None]
        if given:
            raise LostregError(f"evaluate(): {given[0]}= is for your own model; a named "
                               f"backbone ({backbone or DEFAULT_MODEL}) knows its own")
        base, grid = plan(backbone, **options)
        with _held([]):
            return _finish(run_grid(base, **grid), suite, base)
    user = backbone if isinstance(backbone, UserModel) else UserModel(backbone)
    user = dataclasses.replace(user, **{k: v for k, v in plugin.items() if v is not None})
    return _evaluate_own(user, options)


def _all_names(backbone: Any) -> bool:
    return (isinstance(backbone, Sequence) and bool(backbone)
            and all(isinstance(item, str) for item in backbone))


def _evaluate_own(user: UserModel, options: dict[str, Any]) -> EvaluationResult:
    """``evaluate`` for the user's own model: built here (never moved, eval mode only while it
    runs), then the same grid as any named model."""
    model = user.model
    name = check_name(user.name) if user.name else _default_name(model)
    base, grid = plan(name, **options)
    if options["suite"] is not None:
        raise LostregError("suite= runs the suite's named models; drop it to score your own")
    if base.pos_interp != "original" or len(grid["pos_interps"] or ["original"]) > 1:
        raise LostregError("pos_interp: your own model runs as its own code does; there is "
                           "nothing for lostreg to resample")
    if base.ttr_neurons is not None:
        raise LostregError("ttr_neurons: test-time registers need a named or timm: model")
    modules = [m for m in ([model] if isinstance(model, nn.Module) else _weights_of(user))]
    device = _device_for(base.device, modules)
    base = dataclasses.replace(base, device=str(device))
    cls = type(model) if isinstance(model, nn.Module) else None
    source = f"module:{qualified_name(cls)}" if cls is not None else \
        f"callable:{qualified_name(model)}"
    with _held(modules):
        built = build_plugin(user, name=name, source=source,
                             source_sha=None if cls is not None else source_sha256(model),
                             weights=base.weights, device=device, owned=False)
        _check_requests(built, base, grid)
        return _finish(run_grid(base, **grid, backbone=built), None, base)


def _check_requests(built: Any, base: RunConfig, grid: dict[str, Any]) -> None:
    """Every feature map the runs ask for is one the model gives: one line before any folder
    is made (a model that returns its own features has ``own`` and maybe ``attn``, no layers)."""
    if not isinstance(built, OwnFeaturesBackbone):
        return
    values = dict(grid["method_values"])
    for name, key in (("k_patches", "k_patches"), ("gram_biases", "gram_bias")):
        if grid[name] is not None:
            values[key] = grid[name]
    for config in expand_sweep(base, methods=grid["methods"], features=grid["features"],
                               layers=grid["layers"], normalizations=grid["normalizations"],
                               values=values):
        request = feature_request(config, built.spec.default_feature)
        built.check_request(request.kind, request.layer)


def _default_name(model: Any) -> str:
    """``module:<timm architecture or class name>`` or ``function:<name>``."""
    if isinstance(model, nn.Module):
        return "module:" + safe_name(timm_architecture(model) or type(model).__name__)
    return "function:" + safe_name(getattr(model, "__qualname__", type(model).__name__))


def _weights_of(user: UserModel) -> list[nn.Module]:
    given = user.weights_of
    if given is None:
        owner = getattr(user.model, "__self__", None)
        return [owner] if isinstance(owner, nn.Module) else []
    return [given] if isinstance(given, nn.Module) else [m for m in given if isinstance(m, nn.Module)]


def _device_for(device: str, modules: list[nn.Module]) -> torch.device:
    """``auto`` is where the user's model already is (else a GPU when there is one); any other
    value must be a device lostreg can use (and, checked when it is built, the model's)."""
    if device == "auto":
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                return tensor.device
    return resolve_device(device)


@contextlib.contextmanager
def _held(modules: list[nn.Module]) -> Iterator[None]:
    """The user's modules in eval mode while they run; their train/eval flags, the TF32
    switches (lostreg turns TF32 off) and the CPU random state restored afterwards."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    rng = torch.random.get_rng_state()
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        torch.random.set_rng_state(rng)


def _finish(results: list[RunResult], suite: str | None, base: RunConfig) -> EvaluationResult:
    if suite is not None:
        from lostreg.reports import leaderboard

        leaderboard.build_leaderboard(runs_dir=base.output, out_dir=Path(base.output).parent)
    return EvaluationResult(results)


__all__ = ["EvaluationResult", "evaluate", "plan"]
