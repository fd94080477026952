"""Test-time registers: the published neuron list, the hook's semantics against a plain
per-image port of the reference (batch size 1), batch = one by one, the token never reaching
the features, and the planted-neuron round trip (find -> +ttr -> no outliers)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from lostreg.backbones import BackboneSpec, create_backbone, get_backbone_spec, load_neuron_file
from lostreg.backbones.ttr import move_to_register, parse_neuron_list, shipped_neurons
from lostreg.datasets.base import DatasetIndex, ImageRecord
from lostreg.errors import LostregError
from lostreg.features.extract import FeatureRequest, extract, tokens_before_block
from lostreg.reports.analysis.collect import NormsConfig, analyze_norms, load_norms
from lostreg.reports.analysis.neurons import (
    NeuronSearchConfig,
    accumulate_scores,
    find_register_neurons,
    rank_neurons,
)
from lostreg.reports.analysis.tokens import block_outputs, panel_readout

TINY = dict(depth=3, embed_dim=48, num_heads=3)
PUBLISHED = {  # Jiang et al. 2025, dinov2/dinov2/hub/register_neurons.py (LARGE_REGISTER_NEURONS)
    17: [884, 133, 1427, 3464, 2373, 2436, 841, 3574, 2129, 3355, 4047, 3341, 1330, 4031, 844,
         944, 464],
    16: [2301, 3576, 1940, 3463, 1244, 407, 3152, 2517, 3465],
    15: [1714, 3507, 2492, 2680, 131, 720, 3499, 3062, 2625],
    14: [2110, 1510, 1082, 2711, 2464, 147, 543, 581],
    13: [2400],
    12: [3168],
}


def neuron_json(neurons: dict[int, list[int]], write: str = "signed_max") -> dict:
    return {"kind": "lostreg-register-neurons", "write": write,
            "neurons": {str(k): v for k, v in neurons.items()}}


# --- the list and the names --------------------------------------------------------------------


def test_shipped_dinov2_vitl14_list_is_the_published_one() -> None:
    ttr = shipped_neurons("vit_large_patch14_dinov2.lvd142m")
    assert dict((layer, list(n)) for layer, n in ttr.neurons) == PUBLISHED
    assert ttr.num_neurons == 45 and ttr.write == "signed_max"
    spec = get_backbone_spec("dinov2+ttr")
    assert spec.name == "dinov2_vitl14+ttr" and spec.ttr.sha256 == ttr.sha256
    assert spec.pos_embed == "dinov2"  # their tt_reg model is the no-register DINOv2
    assert spec.identity_extras() == {"test_time_registers": 1, "ttr_neurons_sha256": ttr.sha256,
                                      "ttr_write": "signed_max"}
    assert get_backbone_spec("dinov2_vitl14").identity_extras() == {}


def test_neuron_list_identity_is_its_content(tmp_path) -> None:
    a = parse_neuron_list(neuron_json({3: [5, 1], 1: [2]}), "a")
    b = parse_neuron_list(neuron_json({1: [2], 3: [1, 5]}), "b")
    c = parse_neuron_list(neuron_json({1: [2], 3: [1, 6]}), "c")
    d = parse_neuron_list(neuron_json({1: [2], 3: [1, 5]}, "per_neuron_max"), "d")
    assert a.sha256 == b.sha256 and len({a.sha256, c.sha256, d.sha256}) == 3


@pytest.mark.parametrize("data,what", [
    ({"neurons": {"1": [2]}}, '"kind"'),
    (neuron_json({}), '"neurons"'),
    ({"kind": "lostreg-register-neurons", "neurons": {"x": [1]}}, "layer 'x'"),
    ({"kind": "lostreg-register-neurons", "neurons": {"1": [1, 1]}}, "twice"),
    ({"kind": "lostreg-register-neurons", "neurons": {"1": [-3]}}, "non-negative"),
    ({"kind": "lostreg-register-neurons", "neurons": {"1": [True]}}, "non-negative"),
    (neuron_json({1: [2]}, "mean"), '"write"'),
    ([1, 2], '"kind"'),
])
def test_bad_neuron_files_are_one_line(tmp_path, data, what) -> None:
    path = tmp_path / "n.json"
    path.write_text(json.dumps(data))
    with pytest.raises(LostregError, match=what) as info:
        load_neuron_file(path)
    assert str(path.name) in str(info.value) and "\n" not in str(info.value)


def test_missing_list_says_how_to_find_neurons(tmp_path) -> None:
    with pytest.raises(LostregError, match="analyze register-neurons --model dinov2_vits14"):
        get_backbone_spec("dinov2_vits14+ttr")
    with pytest.raises(LostregError, match="has no \\+ttr"):
        get_backbone_spec("dinov2_vits14", ttr_neurons=tmp_path / "n.json")
    with pytest.raises(LostregError, match="unknown modifier \\+reg"):
        get_backbone_spec("dinov2_vits14+reg")
    with pytest.raises(LostregError, match="not found"):
        get_backbone_spec("dinov2_vits14+ttr", ttr_neurons=tmp_path / "missing.json")


def test_list_for_another_model_is_refused(tmp_path) -> None:
    path = tmp_path / "big.json"
    path.write_text(json.dumps(neuron_json({1: [500]})))
    spec = BackboneSpec("tiny", "vit_small_patch16_224.dino", "dino", 16, 0, model_kwargs=TINY)
    with pytest.raises(LostregError, match="MLP has 192 neurons"):
        create_backbone(spec, "random", ttr_neurons=path)
    path.write_text(json.dumps(neuron_json({7: [1]})))
    with pytest.raises(LostregError, match="layer 7 but the model has 3 blocks"):
        create_backbone(spec, "random", ttr_neurons=path)



def test_list_found_on_another_model_is_applied_with_a_warning(tmp_path, capsys) -> None:
    """A list whose file says it was found on another timm model (dinov2_vits14's neurons on
    its _reg4 twin) fits the shapes, so it runs, but the user is told which model it is for."""
    path = tmp_path / "found.json"
    path.write_text(json.dumps({**neuron_json({1: [3]}),
                                "timm_name": "vit_small_patch14_dinov2.lvd142m"}))
    get_backbone_spec("dinov2_vits14_reg4+ttr", ttr_neurons=path)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "vit_small_patch14_dinov2.lvd142m" in err
    assert "applied here to vit_small_patch14_reg4_dinov2.lvd142m" in err
    get_backbone_spec("dinov2_vits14+ttr", ttr_neurons=path)  # its own model: nothing said
    assert capsys.readouterr().err == ""


# --- the hook ----------------------------------------------------------------------------------


def reference_batch_one(output: torch.Tensor, neurons: list[int]) -> torch.Tensor:
    """The released hook (hub/hook_fn.py, activate_on_registers, normal_values="zero") on one
    image ``(1, T, hidden)`` with one register at the end and the class token first, written
    out plainly: sign_max over tokens x neurons, into every listed neuron of the register."""
    out = output.clone()
    block = out[0, :, neurons]
    pos_max, neg_max = torch.max(block), torch.min(block)
    value = pos_max if abs(pos_max) > abs(neg_max) else neg_max
    out[0, -1:, neurons] = value.expand(1, len(neurons))
    out[0, 1:-1, neurons] = 0
    return out


def test_hook_matches_the_reference_per_image_in_a_batch() -> None:
    generator = torch.Generator().manual_seed(0)
    acts = torch.randn(4, 9, 12, generator=generator)
    acts[1, 3, 5] = -30.0  # a negative extreme wins the signed max
    acts[2, 4, 5], acts[2, 6, 7] = 8.0, -8.0  # a tie goes to the negative one, like sign_max
    neurons = [5, 7, 2]
    ours = move_to_register(acts, torch.tensor(neurons), 1, 1, "signed_max")
    for i in range(4):
        assert torch.equal(ours[i:i + 1], reference_batch_one(acts[i:i + 1], neurons))
    assert ours[1, -1, 5] == -30.0 and ours[2, -1, 2] == -8.0
    untouched = [n for n in range(12) if n not in neurons]
    assert torch.equal(ours[:, :, untouched], acts[:, :, untouched])
    assert torch.equal(ours[:, 0], acts[:, 0])  # the class token keeps its activations


def test_hook_zeroes_patches_only_and_per_neuron_variant() -> None:
    acts = torch.arange(2 * 8 * 4, dtype=torch.float32).reshape(2, 8, 4) - 20
    out = move_to_register(acts, torch.tensor([1, 3]), 3, 1, "per_neuron_max")
    assert torch.equal(out[:, :3], acts[:, :3])  # class + 2 trained registers untouched
    assert (out[:, 3:7][:, :, [1, 3]] == 0).all()
    assert torch.equal(out[:, -1, [1, 3]], acts[:, :, [1, 3]].amax(dim=1))


# --- on models ---------------------------------------------------------------------------------


def tiny_spec(timm_name: str, patch: int, registers: int = 0, **kw) -> BackboneSpec:
    return BackboneSpec(f"tiny_{timm_name}", timm_name, "timm", patch, registers,
                        model_kwargs=dict(TINY), **kw)


@pytest.fixture(scope="module")
def neuron_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ttr") / "neurons.json"
    path.write_text(json.dumps(neuron_json({0: [3, 40, 41], 1: [7, 100]})))
    return path


@pytest.mark.parametrize("timm_name,patch,registers", [
    ("vit_small_patch16_224.dino", 16, 0),
    ("vit_small_patch14_reg4_dinov2.lvd142m", 14, 4),
    ("vit_small_patch16_dinov3.lvd1689m", 16, 4),
    ("vit_huge_plus_patch16_dinov3.lvd1689m", 16, 4),
])
def test_ttr_features_batch_equals_one_by_one_and_drop_the_token(neuron_path, timm_name, patch,
                                                                registers) -> None:
    spec = tiny_spec(timm_name, patch, registers)
    plain = create_backbone(spec, "random", seed=2)
    ttr = create_backbone(spec, "random", seed=2, ttr_neurons=neuron_path)
    for backbone in (plain, ttr):  # layer scales start at 1e-5: make every block count
        with torch.no_grad():
            for name, param in backbone.model.named_parameters():
                if name.endswith(("gamma_1", "gamma_2", "ls1.gamma", "ls2.gamma")):
                    param.fill_(1.0)
    assert ttr.spec.name.endswith("+ttr") and ttr.num_suffix_tokens == 1
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 3 * patch, 4 * patch, generator=gen)
    images[1] *= 4  # images with very different activation ranges
    kinds = [FeatureRequest(k) for k in ("k", "v", "attn")] + [FeatureRequest("k", 0)]
    batch = extract(ttr, images, kinds)
    for kind in kinds:
        assert batch[kind].shape[1] == 12  # patches only: the test-time register is stripped
        alone = torch.cat([extract(ttr, images[i:i + 1], [kind])[kind] for i in range(3)])
        torch.testing.assert_close(batch[kind], alone, rtol=0, atol=1e-6)
    # block 0's input: the appended token is zero, after the patches
    x0 = tokens_before_block(ttr.model, images, 0)
    assert x0.shape[1] == plain.num_prefix_tokens + 12 + 1
    assert torch.equal(x0[:, -1], torch.zeros_like(x0[:, -1]))
    # the register changes what the patches see, and the hooks change block 1 on
    assert not torch.allclose(extract(plain, images, [FeatureRequest("k")])[FeatureRequest("k")],
                              batch[FeatureRequest("k")])


def test_panels_show_the_test_time_register_like_a_register(neuron_path) -> None:
    backbone = create_backbone(tiny_spec("vit_small_patch14_reg4_dinov2.lvd142m", 14, 4),
                               "random", ttr_neurons=neuron_path)
    images = torch.randn(1, 3, 42, 56, generator=torch.Generator().manual_seed(3))
    readout = panel_readout(backbone, images, "k")
    assert readout.names == ["CLS", "register 1", "register 2", "register 3", "register 4",
                             "test-time register"]
    assert readout.attention.shape == (1, 6, 12) and readout.output.shape == (1, 6 + 12, 48)
    torch.testing.assert_close(readout.attention.sum(-1), torch.ones(1, 6))
    _, outputs = block_outputs(backbone.model, images, [2])
    assert outputs[2].shape[1] == 5 + 12  # norms never see the test-time register
    assert torch.equal(readout.output[:, 6:], outputs[2][:, 5:])


# --- planted neuron: find it, move it, outliers gone ------------------------------------------

LAYER, NEURON = 1, 5
WHITE = {"a": [(0, 1), (2, 3)], "b": [(1, 1)], "c": [(3, 0), (0, 3)], "d": [(2, 2)],
         "e": [(1, 2), (3, 3)], "f": [(0, 0)]}


def plant(backbone) -> None:
    """Tokens carry the patch's mean intensity in channel 0 (and a constant in channel 1); block
    1's neuron 5 fires only on white patches and writes a large vector: those tokens become
    high-norm outliers, as register neurons make them."""
    model = backbone.model
    with torch.no_grad():
        model.pos_embed.zero_()
        model.cls_token.zero_()
        model.cls_token[0, 0, 1] = 1.0
        proj = model.patch_embed.proj
        proj.weight.zero_()
        proj.weight[0] = 1.0 / (3 * 16 * 16)
        proj.bias.zero_()
        proj.bias[1] = 1.0
        mlp = model.blocks[LAYER].mlp
        mlp.fc1.weight[NEURON] = 0.0
        mlp.fc1.weight[NEURON, 0] = 10.0
        mlp.fc1.bias[NEURON] = -40.0
        mlp.fc2.weight[:, NEURON] = 0.0
        mlp.fc2.weight[2, NEURON] = 20.0


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    records = []
    for image_id, cells in WHITE.items():
        array = (128 + rng.integers(-10, 11, (64, 64, 3))).astype(np.uint8)
        for row, col in cells:
            array[row * 16:(row + 1) * 16, col * 16:(col + 1) * 16] = 255
        path = root / f"{image_id}.png"
        Image.fromarray(array).save(path)
        records.append(ImageRecord(image_id, path, 64, 64, ()))
    index = DatasetIndex("planted", "all", tuple(records), root)
    spec = BackboneSpec("planted_vit", "vit_small_patch16_224.dino", "dino", 16, 0,
                        pos_embed="dino", model_kwargs=dict(TINY))
    backbone = create_backbone(spec, "random", seed=1)
    plant(backbone)
    weights = root / "planted.pth"
    torch.save(backbone.model.state_dict(), weights)
    return spec, weights, index, root


def outlier_cells(maps, image_index: int, threshold: float) -> set[tuple[int, int]]:
    rows, cols = maps.grid(image_index)
    values = maps.norms[max(maps.norms)][maps.offsets[image_index]:maps.offsets[image_index + 1]]
    return {divmod(int(i), cols) for i in np.flatnonzero(values.astype(np.float64) > threshold)}


def test_planted_neuron_is_found_and_ttr_removes_the_outliers(planted) -> None:
    spec, weights, index, root = planted
    backbone = create_backbone(spec, str(weights))
    norms_config = NormsConfig(model=spec.name, weights=str(weights), device="cpu",
                               num_workers=0, progress=False)
    before = analyze_norms(replace(norms_config, output=root / "before"), backbone,
                           index).payload
    assert before["threshold"] is not None
    maps = load_norms(root / "before")[1]
    for i, row in enumerate(before["per_image"]):  # exactly the white patches are outliers
        assert outlier_cells(maps, i, before["threshold"]) == set(WHITE[row["image_id"]])

    config = NeuronSearchConfig(model=spec.name, output=root / "neurons.json",
                                weights=str(weights), device="cpu", top_k=3, outlier_layer=-1,
                                num_workers=0, progress=False)
    data, summary = find_register_neurons(config, backbone, index)
    assert data["neurons"][str(LAYER)][0] == NEURON
    ranked = [(int(layer), n) for layer, ns in data["neurons"].items() for n in ns]
    assert len(ranked) == 3 and max(data["scores"][str(LAYER)]) == data["scores"][str(LAYER)][0]
    assert data["provenance"]["images_with_outliers"] == len(WHITE)
    assert "layer 1 neuron 5" in summary

    top_one = root / "top1.json"
    top_one.write_text(json.dumps({**data, "neurons": {str(LAYER): [NEURON]}}))
    with_ttr = create_backbone(spec, str(weights), ttr_neurons=top_one)
    # the same threshold as the analysis that found them (the input embedding of a white patch
    # still has a larger norm than a grey one's, so an automatic split would cut there)
    after = analyze_norms(replace(norms_config, output=root / "after",
                                            threshold=[before["threshold"]]), with_ttr,
                          index).payload
    assert after["n_outliers"] == 0 and after["images_with_outliers"] == 0
    assert max(row["max_norm"] for row in after["per_image"]) < before["threshold"] / 3
    feats = extract(with_ttr, torch.zeros(1, 3, 64, 64), [FeatureRequest("k")])
    assert feats[FeatureRequest("k")].shape == (1, 16, 48)


def test_ranking_filters_layers_then_keeps_top_k_with_stable_ties() -> None:
    scores = torch.tensor([[0.5, 3.0, 1.0], [2.0, 3.0, 0.1], [9.0, 0.0, 0.0]], dtype=torch.float64)
    assert rank_neurons(scores, 3, highest_layer=1) == [(0, 1, 3.0), (1, 1, 3.0), (1, 0, 2.0)]
    assert rank_neurons(scores, 1, highest_layer=2) == [(2, 0, 9.0)]


def test_scores_average_over_images_with_outliers_only(planted) -> None:
    spec, weights, _, _ = planted
    backbone = create_backbone(spec, str(weights))
    white = torch.full((1, 3, 64, 64), 2.4)
    grey = torch.zeros(1, 3, 64, 64)
    both = accumulate_scores(backbone, [torch.cat([white, grey])], 1, 50.0, 2)
    alone = accumulate_scores(backbone, [white], 1, 50.0, 2)
    assert both.images == 2 and both.images_with_outliers == 1
    torch.testing.assert_close(both.scores, alone.scores)
    with pytest.raises(LostregError, match="no image has a token above norm"):
        accumulate_scores(backbone, [grey], 1, 50.0, 2)


def test_register_neurons_command_writes_a_list_that_ttr_reads(tmp_path, capsys) -> None:
    from lostreg.analyze import main

    out = tmp_path / "found" / "neurons.json"
    argv = ["register-neurons", "--model", "dinov2_vits14", "--weights", "random", "--dataset",
            "demo", "--data-root", str(tmp_path / "data"), "--limit", "3", "--threshold", "0",
            "--top-k", "5", "--highest-layer", "3", "--output", str(out), "--num-workers", "0",
            "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    assert "register neurons of dinov2_vits14: 5 neurons" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["provenance"]["smoke_run"] and data["provenance"]["outlier_layer"] == 10
    assert all(int(layer) <= 3 for layer in data["neurons"])
    backbone = create_backbone("dinov2_vits14+ttr", "random", ttr_neurons=out)
    assert backbone.spec.ttr.num_neurons == 5 and backbone.spec.ttr.source == str(out.resolve())
    assert main([*argv[:2], "dinov2_vits14+ttr", *argv[3:]]) == 2
    assert "without +ttr" in capsys.readouterr().err
    # the error of a +ttr model without a shipped list says to pass --ttr-neurons: norms takes it
    norms = ["norms", "--model", "dinov2_vits14+ttr", "--weights", "random", "--dataset", "demo",
             "--data-root", str(tmp_path / "data"), "--limit", "2", "--num-workers", "0",
             "--no-progress", "--device", "cpu", "--output", str(tmp_path / "norms")]
    assert main(norms) == 2 and "--ttr-neurons" in capsys.readouterr().err
    assert main([*norms, "--ttr-neurons", str(out)]) == 0
    assert json.loads((tmp_path / "norms" / "norms.json").read_text())["model"] == \
        "dinov2_vits14+ttr"


def test_analyses_rebuild_a_ttr_run_from_its_config(tmp_path, neuron_path) -> None:
    """``analyze show/attribution`` rebuild the run's model: the neuron file recorded in
    config.json (``BackboneSpec.describe()``) is reused and its sha256 checked."""
    from lostreg.reports.analysis.runs import RunInfo, ttr_neurons_argument

    spec = get_backbone_spec("dinov2_vitl14+ttr")
    shipped = RunInfo(tmp_path, {"ttr_neurons": spec.describe()["ttr_neurons"]}, [])
    assert ttr_neurons_argument(shipped) is None
    found = parse_neuron_list(json.loads(neuron_path.read_text()), str(neuron_path))
    own = RunInfo(tmp_path, {"ttr_neurons": found.describe()}, [])
    assert ttr_neurons_argument(own) == str(neuron_path)
    gone = RunInfo(tmp_path, {"ttr_neurons": {**found.describe(), "source": "/nope.json"}}, [])
    with pytest.raises(LostregError, match="register-neuron list '/nope.json' is gone"):
        ttr_neurons_argument(gone)
    assert ttr_neurons_argument(RunInfo(tmp_path, {}, [])) is None
