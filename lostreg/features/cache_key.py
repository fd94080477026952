"""The feature cache's key and the folder it names: torch-free, so that listing a cache
(``python -m lostreg.cache``) does not wait seconds for torch to import.

A cache folder is ``<dataset>-<split>-<arch>-<feature>-<hash>`` (``folder_name``), where the hash
is the sha256 of the key's JSON (``key_hash``) and the key holds everything that decides the
features, the versions of the code that computed them included (``cache_key``; see
``lostreg.features.cache``). So code of another format, lostreg or result version names
other folders, and never writes into, nor reads, a folder of this code's keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lostreg.errors import LostregError, os_error_message
from lostreg.io import dumps_strict, loads_bounded, read_bounded

# 2: whole-file checksum, fingerprints instead of file sizes. The key holds the format, so a
# new format gets a new folder; a shard of another format is refused by its magic.
FORMAT_VERSION = 2
#: ``--cache-features`` without a folder, and ``python -m lostreg.cache`` without one.
DEFAULT_CACHE_DIR = Path("results/cache")
#: The most bytes a ``key.json`` may have (one is about 1 KB).
MAX_KEY_BYTES = 1 << 20


class KeyFileMissing(LostregError):
    """No ``key.json`` at all: a folder being created, not a damaged one."""


def read_key_file(key_file: Path) -> Any:
    """``key_file`` (a cache folder's ``key.json``) parsed by the bounded reader; whatever it
    holds, checked by the caller. The one reader of key files, for the cache that reads its
    own and for the listing of every folder, so both refuse the same files: a symbolic link
    (never followed: it could name any file), anything but a regular file (a FIFO would block),
    a file too large, too deep or not JSON. Raises ``LostregError`` with one line naming the
    file (``KeyFileMissing`` when there is none)."""
    try:
        st = os.lstat(key_file)
    except FileNotFoundError:
        raise KeyFileMissing(f"{key_file}: missing") from None
    except OSError as exc:
        raise LostregError(f"{key_file}: {os_error_message(exc)}") from None
    if stat.S_ISLNK(st.st_mode):
        raise LostregError(f"{key_file}: a symbolic link (never followed)")
    if not stat.S_ISREG(st.st_mode):
        raise LostregError(f"{key_file}: not a regular file")
    return loads_bounded(read_bounded(key_file, MAX_KEY_BYTES, "cache key file"),
                         str(key_file), max_bytes=None)


def cache_key(*, model: str, timm_name: str, model_kwargs: dict, weights: str,
              num_prefix_tokens: int, mean: Sequence[float], std: Sequence[float],
              patch_size: int, pos_embed: str, dataset: str, split: str, feature: str,
              precision: str, storage: str, lostreg_version: str,
              result_version: int) -> dict[str, Any]:
    """Everything that decides the cached features (see ``lostreg.features.cache``); the code's
    ``result_version`` (``lostreg.version.RESULT_VERSION``) among them, so features of code
    that computes other results are never read."""
    return {
        "format": FORMAT_VERSION,
        "model": model,
        "timm_name": timm_name,
        "model_kwargs": json_safe_kwargs(model_kwargs),
        "weights": weights,
        "num_prefix_tokens": int(num_prefix_tokens),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "patch_size": int(patch_size),
        "pos_embed": pos_embed,
        "dataset": dataset,
        "split": split,
        "feature": feature,
        "precision": precision,
        "dtype": storage,
        "lostreg_version": lostreg_version,
        "result_version": int(result_version),
    }


def _non_finite_as_repr(constant: str) -> str:
    """``NaN``, ``Infinity`` or ``-Infinity`` (what ``json.dumps`` writes for a float that is
    not finite) as the float's ``repr``: ``nan``, ``inf``, ``-inf``."""
    return repr(float(constant))


def json_safe_kwargs(model_kwargs: dict) -> Any:
    """``model_kwargs`` as the key holds them: keys sorted, every value JSON can hold as it is,
    any other as its ``repr`` (a callable, a dtype, and a NaN or infinite float), so the key is
    deterministic and can be written strictly (``key.json``, the shard headers): a NaN kwarg
    once made the strict ``key.json`` write raise a traceback. A dict whose keys JSON cannot
    hold or sort (a tuple, keys of mixed types) is one line: no deterministic key exists."""
    try:
        text = json.dumps(model_kwargs, sort_keys=True, default=repr)
    except (TypeError, ValueError) as exc:
        raise LostregError(f"the model's kwargs cannot enter the feature cache key ({exc}); "
                           "run without --cache-features, or give the kwargs string keys"
                           ) from None
    return json.loads(text, parse_constant=_non_finite_as_repr)


def key_hash(key: dict[str, Any]) -> str:
    """The sha256 of the key's JSON. Strict (``dumps_strict``: the same text as ``json.dumps``
    for any key that can be written): a key holding NaN or infinity is refused here, with one
    line naming the field, rather than when its ``key.json`` or a shard header is written."""
    return hashlib.sha256(dumps_strict(key, "feature cache key", sort_keys=True).encode()
                          ).hexdigest()


def safe_name(text: str) -> str:
    """``text`` with every run of characters other than letters, digits, ``_ . -`` as one
    ``_``: a cache folder or index file name never holds a separator or a space."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def folder_name(key: dict[str, Any], digest: str | None = None) -> str:
    """The folder of ``key`` under the cache root (``digest``: its ``key_hash``, if known)."""
    digest = key_hash(key) if digest is None else digest
    arch = str(key["timm_name"]).split(".")[0]
    return safe_name(f"{key['dataset']}-{key['split']}-{arch}-{key['feature']}-{digest[:12]}")
