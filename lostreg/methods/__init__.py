"""Discovery methods: feature maps -> one box per image (and the patch mask it came from).

``registry`` holds the entry every method registers (``MethodSpec``: its batched path, its
per-image reference written like the published code, its parameters, the features it reads);
``geometry`` the patch-grid geometry the methods share (connected components, LOST's box
convention). Each method is one module: ``lost``, ``tokencut``, ``dinoseg``. Adding one is a
module here with one ``register_method`` call plus its import below.
"""

# Each module registers itself; the order is the registry's, which --help, the suites and the
# reports list: LOST (the default) first, as every release did.
# isort: off
from lostreg.methods import lost  # noqa: F401
from lostreg.methods import dinoseg  # noqa: F401
from lostreg.methods import tokencut  # noqa: F401
# isort: on
from lostreg.methods.registry import (
    DEFAULT_METHOD,
    METHODS,
    MethodOutput,
    MethodSpec,
    Param,
    get_method,
    list_methods,
    register_method,
)

__all__ = ["DEFAULT_METHOD", "METHODS", "MethodOutput", "MethodSpec", "Param", "get_method",
           "list_methods", "register_method"]
