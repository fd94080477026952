"""Every rule for run folders written by earlier releases, in one place.

A run folder is kept for years, and each release added settings. Older folders stay valid:

* **Names.** Before readable names a folder was ``<dataset>-<model>-<feature>-<hash>``; such
  folders are found and reused under their old names (``legacy_run_id``). Before a run on a
  partial dataset (``--allow-partial-dataset``) was marked ``-partial<images>`` in its name,
  it was named like a full run; such a folder too is found under its name
  (``earlier_run_ids``). The hash never changed: the image count was always in the identity.
* **Identity.** Settings added after the first release enter a run's identity (and so its
  hash) only when they differ from the value every older run had (``IDENTITY_DEFAULTS``), so
  an older run keeps its id; LOST's parameters sit in the identity without a ``method`` key
  (``MethodSpec.legacy_identity``).
* **config.json.** Folders written before the method registry, the protocol axes and the
  evaluation layer lack the newer keys; they are read with what those runs used
  (``CONFIG_DEFAULTS``): LOST with its ``k_patches``/``gram_bias`` at the top level, the last
  block, no normalisation, each family's own position-embedding resampling, no test-time
  register, boxes scored by CorLoc.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

LEGACY_METHOD = "lost"

# settings added after the first release: in the identity only when they differ from these
IDENTITY_DEFAULTS: dict[str, Any] = {"layer": -1, "normalize": "none"}

# config.json keys an older folder lacks, with the value its run used
CONFIG_DEFAULTS: dict[str, Any] = {
    "method": LEGACY_METHOD,
    "layer": -1,
    "normalize": "none",
    "pos_interp": "original",
    "test_time_registers": 0,
    "target": "boxes",
    "metrics": ["corloc"],
}


def add_if_changed(identity: dict[str, Any], key: str, value: Any) -> None:
    """Put ``key`` into ``identity`` only when ``value`` is not what every older run had."""
    if value != IDENTITY_DEFAULTS[key]:
        identity[key] = value


def digest(identity: dict) -> str:
    """The 10-hex-digit hash of an identity that ends every run id."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def safe_model(identity: dict) -> str:
    """The model name as a folder name holds it (``timm:a/b`` -> ``timm_a_b``)."""
    return identity["model"].replace(":", "_").replace("/", "_")


def earlier_run_ids(identity: dict, smoke: bool, unmarked: str) -> list[str]:
    """The names earlier releases gave the run of ``identity``, newest first: ``unmarked``
    (the readable name without the partial-dataset mark) for a run on a partial dataset, then
    the name before readable names."""
    names = [unmarked] if "dataset_images" in identity else []
    return names + [legacy_run_id(identity, smoke)]


def legacy_run_id(identity: dict, smoke: bool) -> str:
    """The run id of releases before readable names (``<dataset>-<model>-<feature>-<hash>``)."""
    prefix = "smoke-" if smoke else ""
    return f"{prefix}{identity['dataset']}-{safe_model(identity)}-{identity['feature']}-{digest(identity)}"


def config_value(config: dict[str, Any], key: str) -> Any:
    """``config[key]``, or what a folder written before ``key`` existed used."""
    return config.get(key, CONFIG_DEFAULTS[key])
