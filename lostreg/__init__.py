"""lostreg: how much do register tokens change what a ViT's features can localize?

Pipeline stages, each a module with a narrow signature:
``datasets`` (records) -> ``backbones`` (models) -> ``features`` (last-layer q/k/v of patch
tokens) -> ``methods.lost`` (one box per image) -> ``metrics`` (CorLoc) -> ``run`` (artefacts).
"""

__version__ = "0.1.0"
