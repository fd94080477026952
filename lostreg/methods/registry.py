"""The method registry: one entry maps a short name to a method and its parameters.

A method turns a batch of per-patch features into one box per image. Every method speaks the
same narrow, batch-first signature, so the run pipeline never needs to know which one runs::

    spec.run(feats, grid, patch_size, sizes, params) -> MethodOutput

* ``feats``: ``(B, N, D)`` float32 patch features (class and register tokens already dropped),
  row-major on ``grid = (rows, cols)`` of the padded images;
* ``sizes``: ``(B, 2)`` long tensor, the unpadded ``(H, W)`` of each image;
* ``params``: every parameter of ``spec.params`` by name (defaults filled in).

``spec.reference`` is the plain per-image path written step by step like the method's
published code; tests hold the batched path to it. Adding a method is one module in this
folder with one ``register_method`` call, imported in ``lostreg/methods/__init__.py``: the CLI
flags, run ids, config.json and the leaderboard all come from the entry.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from lostreg.errors import LostregError, did_you_mean

if TYPE_CHECKING:  # only in annotations: this module imports without torch (see declared_methods)
    import torch


class MethodOutput(NamedTuple):
    """What every method returns for a batch of B images on a ``rows x cols`` patch grid.

    ``box``: ``(B, 4)`` long, ``[x1, y1, x2, y2]`` in pixels, clipped to each image;
    ``seed``: ``(B,)`` long, the seed patch (flat row-major index), ``-1`` for a method that has
    no seed; ``mask``: ``(B, rows, cols)`` bool, the final patch mask the box was drawn around;
    ``maps``: what else the method knows per patch, by name, each ``(B, rows, cols)`` (LOST:
    ``degree`` and the seed ``expansion``; TokenCut: ``eigenvector`` and ``bipartition``;
    DINO-seg: ``kept``, its thresholded attention). Metrics and reports pick what they need;
    nothing is copied off the device unless something reads it.
    A per-image reference returns ``box``, ``seed`` and ``mask`` without the batch axis.
    """

    box: torch.Tensor
    seed: torch.Tensor
    mask: torch.Tensor
    maps: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class Param:
    """One parameter of a method, which becomes a CLI flag taking a comma list (a sweep).

    ``switch``: the flag takes no value and sets the parameter to ``switch`` (e.g.
    ``--no-binary-graph`` sets ``binary_graph`` to False). ``on_config``: the value lives on
    ``RunConfig`` as a field of the same name (LOST's ``k_patches`` and ``gram_bias``, which
    predate the registry) rather than in ``RunConfig.method_params``.
    """

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    flag: str = ""
    choices: tuple[Any, ...] | None = None
    switch: Any = None
    on_config: bool = False

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def check(self, value: Any, method: str) -> Any:
        """``value`` converted and validated; one clear line otherwise."""
        if isinstance(value, str) and not isinstance(self.default, str):
            try:
                value = self.parse(value)
            except ValueError:
                raise LostregError(f"{self.cli_flag} {value!r}: not a valid value for "
                                   f"{method}") from None
        if self.choices is not None and value not in self.choices:
            raise LostregError(f"{self.cli_flag} {value!r}: expected one of "
                               f"{', '.join(map(str, self.choices))}")
        return value


@dataclass(frozen=True)
class MethodSpec:
    """What the benchmark knows about one discovery method.

    ``feature_kinds``: the feature kinds it can read (``None``: any per-patch vector kind, q/k/v
    and the like); ``default_feature``: the kind it reads unless told (``None``: the backbone's
    default feature). ``check(params)`` validates a full parameter set (one line, or None).
    ``legacy_identity``: the run id carries the parameters without a ``method`` key (LOST's
    runs predate the registry and keep their ids). ``run_many(feats, grid, patch_size, sizes,
    [params, ...])``, optional: several parameter sets on the same features at once, each
    output equal to ``run``'s (LOST computes ``F F^T`` once for every bias and k of a sweep).
    ``saliency_mask``, optional: which of its per-patch masks a saliency run scores.
    """

    name: str
    run: Callable[[torch.Tensor, tuple[int, int], int, torch.Tensor, dict[str, Any]],
                  MethodOutput]
    reference: Callable[[torch.Tensor, tuple[int, int], int, tuple[int, int], dict[str, Any]],
                        MethodOutput]
    params: tuple[Param, ...] = ()
    feature_kinds: tuple[str, ...] | None = None
    default_feature: str | None = None
    legacy_identity: bool = False
    title: str = ""
    description: str = ""
    check: Callable[[dict[str, Any]], str | None] | None = None
    run_many: Callable[[torch.Tensor, tuple[int, int], int, torch.Tensor,
                        Sequence[dict[str, Any]]], list[MethodOutput]] | None = None
    # the patch mask a saliency run scores, ``(B, rows, cols)`` bool, from an output (None:
    # ``mask``, the patches the box was drawn around: TokenCut's and LOST's seed component)
    saliency_mask: Callable[[MethodOutput], torch.Tensor] | None = None

    def mask_for_saliency(self, output: MethodOutput) -> torch.Tensor:
        """The patch mask a saliency run upsamples and scores (see ``saliency_mask``)."""
        return output.mask if self.saliency_mask is None else self.saliency_mask(output)

    def run_all(self, feats: torch.Tensor, grid: tuple[int, int], patch_size: int,
                sizes: torch.Tensor, params: Sequence[dict[str, Any]]) -> list[MethodOutput]:
        """``run`` for each parameter set (through ``run_many`` when the method has it)."""
        if self.run_many is not None and len(params) > 1:
            return self.run_many(feats, grid, patch_size, sizes, params)
        return [self.run(feats, grid, patch_size, sizes, p) for p in params]

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def resolve(self, values: dict[str, Any]) -> dict[str, Any]:
        """Every parameter, ``values`` over the defaults, validated; unknown names refused."""
        names = {p.name for p in self.params}
        unknown = sorted(set(values) - names)
        if unknown:
            raise LostregError(f"--method {self.name} has no parameter {unknown[0]!r} "
                               f"(its parameters: {', '.join(sorted(names)) or 'none'})")
        params = {p.name: p.check(values.get(p.name, p.default), self.name) for p in self.params}
        problem = self.check(params) if self.check is not None else None
        if problem:
            raise LostregError(problem)
        return params

    def identity(self, params: dict[str, Any]) -> dict[str, Any]:
        """What the run id records of the method (see ``legacy_identity``)."""
        if self.legacy_identity:
            return dict(params)
        return {"method": self.name, "method_params": dict(sorted(params.items()))}

    def feature_for(self, requested: str | None, backbone_default: str) -> str:
        """The feature kind a run of this method reads, or one clear line."""
        if requested is None:
            return self.default_feature or backbone_default
        if self.feature_kinds is not None and requested not in self.feature_kinds:
            raise LostregError(f"--method {self.name} reads {'/'.join(self.feature_kinds)}, not "
                               f"--features {requested}")
        return requested


METHODS: dict[str, MethodSpec] = {}
DEFAULT_METHOD = "lost"


def _builtins_first(name: str = "") -> None:
    """Register the built-in methods before anything else is registered or looked up, so the
    registry's order is theirs whoever imports this module first (a plugin may)."""
    from lostreg.methods import BUILTIN_METHODS, load_builtin_methods

    if name not in BUILTIN_METHODS:
        load_builtin_methods()


def register_method(spec: MethodSpec) -> MethodSpec:
    _builtins_first(spec.name)
    flags = {p.cli_flag for other in METHODS.values() for p in other.params if other.name != spec.name}
    clash = [p.cli_flag for p in spec.params if p.cli_flag in flags]
    if clash:
        raise ValueError(f"method {spec.name}: flag {clash[0]} is already another method's")
    METHODS[spec.name] = spec
    return spec


def list_methods() -> list[str]:
    _builtins_first()
    return list(METHODS)


def get_method(name: str) -> MethodSpec:
    _builtins_first()
    if name in METHODS:
        return METHODS[name]
    raise LostregError(f"--method {name!r}: unknown method; {did_you_mean(name, METHODS)}")


# --- the built-in entries, read without running their modules ------------------------------------


def _literal_entry(call: ast.Call) -> tuple[str, str] | None:
    """``(name, title)`` of a ``MethodSpec(...)`` call spelled with literal strings, else None."""
    if not (isinstance(call.func, ast.Name) and call.func.id == "MethodSpec"):
        return None
    values: dict[str, ast.expr] = {}
    if call.args:
        values["name"] = call.args[0]
    for keyword in call.keywords:
        if keyword.arg is None:  # **kwargs: not known without running the module
            return None
        values[keyword.arg] = keyword.value
    texts = {key: node.value for key, node in values.items()
             if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    if "name" not in texts or ("title" in values and "title" not in texts):
        return None
    return texts["name"], texts.get("title", "")


@lru_cache(maxsize=1)
def declared_methods() -> dict[str, str] | None:
    """Each built-in method's title by name, in registry order, read from its module's source
    (its one ``register_method(MethodSpec(...))`` call) without running it: the leaderboard
    needs only these, and running the modules imports torch (2-3 s of a 3 s rebuild). None
    when a module's entry is not spelled with literal strings: then ask ``METHODS``
    (``tests/test_leaderboard_speed.py`` holds the two equal)."""
    from lostreg.methods import BUILTIN_METHODS

    titles: dict[str, str] = {}
    for module in BUILTIN_METHODS:
        source = (Path(__file__).parent / f"{module}.py").read_text(encoding="utf-8")
        calls = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
                 and isinstance(node.func, ast.Name) and node.func.id == "register_method"]
        entry = (_literal_entry(calls[0].args[0]) if len(calls) == 1 and calls[0].args
                 and isinstance(calls[0].args[0], ast.Call) else None)
        if entry is None or entry[0] in titles:
            return None
        titles[entry[0]] = entry[1]
    return titles
