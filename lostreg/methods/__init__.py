"""Discovery methods: feature maps -> one box per image (and the patch mask it came from).

``registry`` holds the entry every method registers (``MethodSpec``: its batched path, its
per-image reference written like the published code, its parameters, the features it reads);
``geometry`` the patch-grid geometry the methods share (connected components, LOST's box
convention). Each method is one module: ``lost``, ``tokencut``, ``dinoseg``. Adding one is a
module here with one ``register_method`` call plus its name in ``BUILTIN_METHODS`` below.

Importing this package is cheap: the method modules (which import torch, 2-3 s on a CPU) are
imported the first time one of the registry's names below is used (``METHODS``,
``get_method``, ...), so a report that needs only the methods' names, titles and order
(``registry.declared_methods``: the leaderboard) never imports torch. ``from lostreg.methods
import METHODS`` gives every built-in method, as it always did.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# The built-in methods' modules, each registering itself, in the registry's order (--help, the
# suites and the reports list them in it): LOST (the default) first, as every release did.
BUILTIN_METHODS = ("lost", "dinoseg", "tokencut")

__all__ = ["DEFAULT_METHOD", "METHODS", "MethodOutput", "MethodSpec", "Param", "get_method",
           "list_methods", "register_method"]


def load_builtin_methods() -> None:
    """Import (so register) every built-in method, in ``BUILTIN_METHODS`` order."""
    for module in BUILTIN_METHODS:
        import_module(f"{__name__}.{module}")


def __getattr__(name: str) -> Any:
    """The registry's public names, with every built-in method registered first."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    load_builtin_methods()
    from lostreg.methods import registry

    value = getattr(registry, name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value
