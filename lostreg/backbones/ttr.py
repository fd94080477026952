"""Test-time registers (Jiang, Dravid, Efros, Gandelsman 2025, "Vision Transformers Don't Need
Trained Registers"; code: github.com/nickjiang2378/test-time-registers).

A few MLP neurons ("register neurons") write the high-norm outlier tokens. At inference one
zero-valued token is appended after the patch tokens (after position embeddings, so it has no
position); at each listed layer a forward hook on the MLP's hidden activation writes the
register neurons' activation into that token and zeroes those neurons on the patch tokens.
The token is then stripped from the features like any register.

Semantics follow the released DINOv2 hub model (``dinov2/dinov2/hub/hook_fn.py``,
``activate_on_registers``, ``normal_values="zero"``, ``scale=1``):

* ``signed_max`` (default): one value per image, the signed maximum (the larger of max and min
  by absolute value; a tie goes to the min) over **all tokens and all listed neurons of the
  layer**, taken before any write, is written into **every** listed neuron of the register;
* ``per_neuron_max`` (the variant in their ``shared/hook_fn.py``): each listed neuron gets its
  own maximum over all tokens.

Their code assumes batch size 1 (``output[0, ...]``); here every image of a batch gets its own
maximum, so a batch equals its images one by one. Their code zeroes every token after the class
token (``1:-num_registers``); with no trained registers that is exactly the patch tokens. Here
only the patch tokens are zeroed, so a model with trained registers keeps them untouched.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from lostreg.errors import LostregError
from lostreg.io import JsonInputError, loads_bounded, read_bounded, unique_keys

NEURON_FILE_KIND = "lostreg-register-neurons"
WRITE_MODES = ("signed_max", "per_neuron_max")
SUFFIX_ATTRIBUTE = "lostreg_num_suffix_tokens"
# A 45-neuron list is 2 KB; even every neuron of a ViT-g (40 x 6144) is well under this.
MAX_NEURON_FILE_BYTES = 16 << 20
_MAX_LAYER_DIGITS = 6  # int() of a longer digit string is slow or refused; no ViT is that deep

# Shipped neuron lists, by timm model (architecture and pretrained tag). Adding one is one entry
# plus its file under lostreg/backbones/neurons/.
SHIPPED_NEURONS = {
    "vit_large_patch14_dinov2.lvd142m": "dinov2_vitl14.json",
}


@dataclass(frozen=True)
class TestTimeRegisters:
    """A register-neuron list and how it is applied; ``sha256`` identifies it in run ids."""

    __test__ = False  # not a pytest class, despite the name

    neurons: tuple[tuple[int, tuple[int, ...]], ...]  # (layer, neuron indices), layers ascending
    source: str
    sha256: str
    write: str = "signed_max"
    count: int = 1
    # the timm model the list was found on, as its file records it (not part of its identity)
    found_on: str | None = field(default=None, compare=False)

    @property
    def num_neurons(self) -> int:
        return sum(len(indices) for _, indices in self.neurons)

    def describe(self) -> dict:
        """What ``config.json`` records about the list."""
        return {"source": self.source, "sha256": self.sha256, "write": self.write,
                "layers": [layer for layer, _ in self.neurons], "num_neurons": self.num_neurons}


def canonical_sha256(neurons: dict[int, list[int]], write: str) -> str:
    """sha256 of the list's content (layers ascending, neurons sorted) and write mode: the same
    neurons give the same identity whatever the file's formatting or order."""
    canonical = {"neurons": {str(layer): sorted(neurons[layer]) for layer in sorted(neurons)},
                 "write": write}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def _bad(source: str, what: str) -> LostregError:
    return LostregError(f"{source}: not a register-neuron file ({what}); write one with "
                        "`python -m lostreg.analyze register-neurons --model M --output FILE`")


def _layer_number(key: object, source: str) -> int:
    """A layer key as an int: ASCII digits only (``str.isdigit`` also accepts ``"²"``, which
    ``int`` refuses), short enough for ``int`` to be instant. ``"01"`` is layer 1, so a list
    giving ``"1"`` and ``"01"`` gives a layer twice, which the caller refuses."""
    if not (isinstance(key, str) and key.isascii() and key.isdigit()
            and len(key) <= _MAX_LAYER_DIGITS):
        raise _bad(source, f"layer {key!r} is not a non-negative integer")
    return int(key)


def parse_neuron_list(data: object, source: str) -> TestTimeRegisters:
    """Validate a neuron-list JSON object: nothing read from disk is trusted unchecked."""
    if not isinstance(data, dict) or data.get("kind") != NEURON_FILE_KIND:
        raise _bad(source, f'"kind" must be "{NEURON_FILE_KIND}"')
    raw = data.get("neurons")
    if not isinstance(raw, dict) or not raw:
        raise _bad(source, '"neurons" must map layer numbers to lists of neuron indices')
    write = data.get("write", "signed_max")
    if write not in WRITE_MODES:
        raise _bad(source, f'"write" must be one of {", ".join(WRITE_MODES)}, got {write!r}')
    neurons: dict[int, list[int]] = {}
    keys: dict[int, str] = {}
    for key, values in raw.items():
        layer = _layer_number(key, source)
        if layer in keys:
            raise _bad(source, f"layer {layer} is given twice (as {keys[layer]!r} and {key!r})")
        keys[layer] = key
        if (not isinstance(values, list) or not values
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)):
            raise _bad(source, f"layer {key}: neurons must be a non-empty list of non-negative integers")
        if len(set(values)) != len(values):
            raise _bad(source, f"layer {key}: a neuron is listed twice")
        neurons[layer] = list(values)
    found_on = data.get("timm_name")
    return TestTimeRegisters(
        tuple((layer, tuple(neurons[layer])) for layer in sorted(neurons)), source,
        canonical_sha256(neurons, write), write,
        found_on=found_on if isinstance(found_on, str) else None)


def load_neuron_file(path: str | Path) -> TestTimeRegisters:
    """Read a neuron list written by ``analyze register-neurons`` (or by hand)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LostregError(f"{path}: --ttr-neurons file not found")
    try:
        data = loads_bounded(read_bounded(path, MAX_NEURON_FILE_BYTES, "neuron file"),
                             str(path), max_bytes=None, object_pairs_hook=unique_keys)
    except JsonInputError as exc:
        raise _bad(str(path), f"not readable JSON: {exc.reason}") from None
    return parse_neuron_list(data, str(path.resolve()))


def shipped_neurons(timm_name: str) -> TestTimeRegisters | None:
    """The published neuron list shipped for ``timm_name``, if there is one."""
    file = SHIPPED_NEURONS.get(timm_name)
    if file is None:
        return None
    text = resources.files("lostreg.backbones").joinpath("neurons", file).read_text("utf-8")
    return parse_neuron_list(loads_bounded(text, f"shipped:{file}"), f"shipped:{file}")


def check_against_model(ttr: TestTimeRegisters, model: nn.Module, family) -> None:
    """Every listed layer and neuron must exist in ``model``: one line naming the list if not."""
    blocks = family.blocks(model)
    depth = len(blocks)
    for layer, indices in ttr.neurons:
        if layer >= depth:
            raise LostregError(f"{ttr.source}: layer {layer} but the model has {depth} blocks; "
                               "is the neuron list for this --model?")
        hidden = blocks[layer].mlp.fc2.in_features
        if max(indices) >= hidden:
            raise LostregError(f"{ttr.source}: layer {layer} lists neuron {max(indices)} but the "
                               f"MLP has {hidden} neurons; is the neuron list for this --model?")
        family.neuron_module(blocks[layer])


def move_to_register(activations: torch.Tensor, neurons: torch.Tensor, num_prefix: int,
                     count: int, write: str) -> torch.Tensor:
    """The hook's effect on one layer's hidden activations ``(B, T, hidden)`` whose last
    ``count`` tokens are test-time registers: register neurons' activation moved there, zeroed
    on the patch tokens. Per image; returns a new tensor."""
    selected = activations[:, :, neurons]  # (B, T, K), read before any write
    if write == "signed_max":
        high = selected.amax(dim=(1, 2))
        low = selected.amin(dim=(1, 2))
        value = torch.where(high.abs() > low.abs(), high, low)  # tie -> min, as sign_max does
        register = value[:, None].expand(-1, neurons.numel())
    else:
        register = selected.amax(dim=1)
    out = activations.clone()
    tokens = out.shape[1]
    out[:, tokens - count:, neurons] = register[:, None, :].to(out.dtype)
    out[:, num_prefix:tokens - count, neurons] = 0
    return out


def install_test_time_registers(model: nn.Module, family, ttr: TestTimeRegisters) -> None:
    """Append the register token and hook every listed layer of ``model`` (in place)."""
    check_against_model(ttr, model, family)
    family.append_tokens(model, ttr.count)
    num_prefix = family.num_prefix_tokens(model)
    for layer, indices in ttr.neurons:
        index = torch.tensor(indices, dtype=torch.long)

        def hook(_module, _inputs, output, index=index):
            return move_to_register(output, index.to(output.device), num_prefix, ttr.count,
                                    ttr.write)

        family.neuron_module(family.blocks(model)[layer]).register_forward_hook(hook)
    setattr(model, SUFFIX_ATTRIBUTE, ttr.count)


def num_suffix_tokens(model: nn.Module) -> int:
    """Tokens after the patch tokens (test-time registers) that every reader must strip."""
    return int(getattr(model, SUFFIX_ATTRIBUTE, 0))
