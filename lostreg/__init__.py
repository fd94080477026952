"""lostreg: how much do register tokens change what a ViT's features can localize?

Pipeline stages, each a module with a narrow signature:
``datasets`` (records) -> ``backbones`` (models) -> ``features`` (last-layer q/k/v of patch
tokens) -> ``methods.lost`` (one box per image) -> ``metrics`` (CorLoc) -> ``run`` (artefacts).

The Python API is one import: ``lostreg.evaluate(backbone, dataset=..., method=...)`` scores a
named backbone or your own model (``lostreg.UserModel``, ``lostreg.PatchFeatures``); see
``lostreg.api``. They are imported on first use, so ``import lostreg`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# a run command (python -m lostreg.run, lostreg run, ...) answers Ctrl-C, SIGTERM and SIGHUP
# with one line from here on, while torch is still being imported (lostreg.signals); any other
# process that imports lostreg keeps Python's own handling
from lostreg.signals import quiet_while_starting  # noqa: E402 - after __version__, before all

quiet_while_starting()

_LAZY = {
    "evaluate": "lostreg.api",
    "EvaluationResult": "lostreg.api",
    "UserModel": "lostreg.backbones.plugin",
    "PatchFeatures": "lostreg.backbones.plugin",
    "PatchFeatureFn": "lostreg.backbones.plugin",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lostreg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["EvaluationResult", "PatchFeatureFn", "PatchFeatures", "UserModel", "__version__",
           "evaluate"]
