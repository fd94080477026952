"""Plug-in backbones: your own module scored through the same pipeline as a named backbone.

Each adapter (timm module, the usual attention layout, ``forward_features``, a plain function)
is held to the named backbone with the same weights: the predictions files are byte-identical
(their lines name no model, so any difference is a different box, seed or score).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import lostreg
from lostreg.backbones import BACKBONES, BackboneSpec
from lostreg.backbones.plugin import PatchFeatures
from lostreg.errors import LostregError
from lostreg.run import main

KW = dict(depth=2, embed_dim=48, num_heads=6)
TIMM_ARCH = "vit_small_patch14_reg4_dinov2"
SPEC = BackboneSpec("tiny_plugin_reg4", f"{TIMM_ARCH}.lvd142m", "dinov2", 14, 4,
                    pos_embed="dinov2_reg", model_kwargs=KW)
LIMIT = 6
COMMON = dict(dataset="demo", limit=LIMIT, num_workers=0, no_progress=True)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def tiny_spec(one_thread):
    BACKBONES[SPEC.name] = SPEC
    yield
    BACKBONES.pop(SPEC.name, None)


def tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(TIMM_ARCH, pretrained=False, dynamic_img_size=True, **KW).eval()


def named_run(tmp_path: Path, weights: Path, *extra: str) -> list[Path]:
    """The named tiny backbone with ``weights`` through the CLI; its run folders."""
    out = tmp_path / "named"
    assert main(["--model", SPEC.name, "--weights", str(weights), "--dataset", "demo",
                 "--data-root", str(tmp_path / "data"), "--output", str(out), "--limit",
                 str(LIMIT), "--num-workers", "0", "--no-progress", *extra]) == 0
    return sorted(out.iterdir())


def predictions(run_dir: Path) -> bytes:
    return (run_dir / "predictions.jsonl").read_bytes()


def by_method(run_dirs) -> dict[str, Path]:
    return {json.loads((d / "config.json").read_text())["method"]: Path(d) for d in run_dirs}


def test_a_timm_module_scores_as_the_named_backbone_with_its_weights(tmp_path) -> None:
    module = tiny_vit()
    torch.save(module.state_dict(), tmp_path / "w.pth")
    named = by_method(named_run(tmp_path, tmp_path / "w.pth", "--method", "lost,tokencut,dinoseg"))
    result = lostreg.evaluate(module, method="lost,tokencut,dinoseg", data_root=tmp_path / "data",
                              output=tmp_path / "own", **COMMON)
    own = by_method(result.run_dirs)
    assert set(own) == set(named) == {"lost", "tokencut", "dinoseg"}
    for method in own:
        assert predictions(own[method]) == predictions(named[method]), method
    config = json.loads((own["lost"] / "config.json").read_text())
    assert config["plugin"]["adapter"] == "family" and config["model"] == f"module:{TIMM_ARCH}"
    assert config["num_registers"] == 4 and config["weights"]["source"] == "module"


class LayoutOnly(nn.Module):
    """A module of the usual attention layout that is no timm class (and has no
    ``num_prefix_tokens``: the adapter counts them on a probe batch)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.blocks = vit.blocks
        self.cls_token = vit.cls_token
        self.patch_size = 14

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(images)


def test_the_usual_layout_is_read_with_the_same_hooks(tmp_path) -> None:
    module = tiny_vit()
    torch.save(module.state_dict(), tmp_path / "w.pth")
    named = by_method(named_run(tmp_path, tmp_path / "w.pth", "--method", "lost,dinoseg"))
    result = lostreg.evaluate(LayoutOnly(module), method=["lost", "dinoseg"],
                              data_root=tmp_path / "data", output=tmp_path / "own", **COMMON)
    own = by_method(result.run_dirs)
    for method in ("lost", "dinoseg"):
        assert predictions(own[method]) == predictions(named[method]), method
    config = json.loads((own["lost"] / "config.json").read_text())
    assert config["plugin"]["adapter"] == "qkv" and config["plugin"]["num_prefix_tokens"] == 5
    assert config["plugin"]["class_sha256"] is not None  # this file, hashed


class Interleaved(nn.Module):
    """qkv packed as (heads, 3, head_dim): a layout lostreg must refuse, not misread."""

    def __init__(self, dim: int = 24, heads: int = 2) -> None:
        super().__init__()
        self.num_heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, self.num_heads, 3, -1).permute(3, 0, 2, 1, 4)
        mixed = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, -1) @ v
        return self.proj(mixed.transpose(1, 2).reshape(b, t, d))


class InterleavedViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 24, 8, 8)
        self.blocks = nn.ModuleList([nn.Module()])
        self.blocks[0].attn = Interleaved()

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        return x + self.blocks[0].attn(x)


def test_a_differently_packed_qkv_is_refused_in_one_line(tmp_path) -> None:
    with pytest.raises(LostregError) as caught:
        lostreg.evaluate(InterleavedViT(), patch_size=8, data_root=tmp_path / "data",
                         output=tmp_path / "own", **COMMON)
    message = str(caught.value)
    assert "\n" not in message and "module:InterleavedViT" in message
    assert "is not softmax(q k^T * scale) v" in message and "return the features" in message
    assert not (tmp_path / "own").exists()


def last_keys(module: nn.Module):
    """The keys of the last block's patch tokens, computed here with a hook of our own."""
    def features(images: torch.Tensor, patch_size: int) -> torch.Tensor:
        seen = {}
        hook = module.blocks[-1].attn.qkv.register_forward_hook(
            lambda m, a, out: seen.setdefault("qkv", out))
        try:
            module.forward_features(images)
        finally:
            hook.remove()
        width = seen["qkv"].shape[-1] // 3
        return seen["qkv"][:, module.num_prefix_tokens:, width:2 * width]
    return features


def test_a_function_returning_keys_scores_as_the_named_keys(tmp_path) -> None:
    module = tiny_vit()
    torch.save(module.state_dict(), tmp_path / "w.pth")
    (named,) = named_run(tmp_path, tmp_path / "w.pth")
    result = lostreg.evaluate(last_keys(module), patch_size=14, weights_of=module,
                              data_root=tmp_path / "data", output=tmp_path / "own", **COMMON)
    (own,) = result.run_dirs
    assert predictions(own) == predictions(named)
    identity = json.loads((own / "config.json").read_text())["identity"]
    assert identity["feature"] == "own" and identity["plugin"]["adapter"] == "callable"
    assert identity["plugin"]["source_sha256"] is not None


def test_a_function_whose_weights_are_hidden_is_refused(tmp_path) -> None:
    module = tiny_vit()
    with pytest.raises(LostregError, match="weights_of="):
        lostreg.evaluate(last_keys(module), patch_size=14, data_root=tmp_path / "data",
                         output=tmp_path / "own", **COMMON)


class TokensOnly(nn.Module):
    """Only ``forward_features`` (tokens, class token first): its own features."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 16, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)


class DictTokens(TokensOnly):
    """``forward_features`` as DINOv2's own code returns it: a dict of normed tokens."""

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = super().forward_features(images)
        return {"x_norm_clstoken": tokens[:, 0], "x_norm_patchtokens": tokens[:, 1:]}


def test_a_dinov2_style_dict_gives_its_patch_tokens(tmp_path) -> None:
    kw = dict(patch_size=8, data_root=tmp_path / "data", **COMMON)
    torch.manual_seed(0)
    plain = lostreg.evaluate(TokensOnly(), output=tmp_path / "plain", **kw)
    torch.manual_seed(0)
    as_dict = lostreg.evaluate(DictTokens(), output=tmp_path / "dict", **kw)
    assert predictions(plain.run_dirs[0]) == predictions(as_dict.run_dirs[0])


def test_a_module_elsewhere_than_the_run_is_one_line_and_never_moved(tmp_path) -> None:
    module = tiny_vit().to("meta")
    with pytest.raises(LostregError, match="the module is on meta but the run is on cpu"):
        lostreg.evaluate(module, device="cpu", data_root=tmp_path / "data",
                         output=tmp_path / "own", **COMMON)
    assert next(module.parameters()).device.type == "meta"


def test_forward_features_gives_its_own_features_and_nothing_else(tmp_path) -> None:
    kw = dict(patch_size=8, data_root=tmp_path / "data", output=tmp_path / "own", **COMMON)
    result = lostreg.evaluate(TokensOnly(), **kw)
    config = json.loads((result.run_dirs[0] / "config.json").read_text())
    assert config["feature"] == "own" and config["plugin"]["num_prefix_tokens"] == 1
    assert result.metrics.loc[0, "n_images"] == LIMIT
    for bad, expected in ((dict(features="k"), "offers own only"),
                          (dict(method="dinoseg"), "return PatchFeatures(feats, attn=...)"),
                          (dict(layer=-2), "returns its own features")):
        with pytest.raises(LostregError, match=expected.replace("(", r"\(").replace(")", r"\)")
                           .replace(".", r"\.")):
            lostreg.evaluate(TokensOnly(), **{**kw, **bad})


@pytest.mark.parametrize("returned, expected", [
    (lambda images, p: torch.zeros(images.shape[0], 7, 4), "expected (1, 6, D)"),
    (lambda images, p: torch.zeros(images.shape[0], 4, 2, 3), "flatten(2).transpose(1, 2)"),
    (lambda images, p: PatchFeatures(torch.zeros(images.shape[0], 6, 4), grid=(3, 2)),
     "expected (2, 3)"),
    (lambda images, p: PatchFeatures(torch.zeros(images.shape[0], 6, 4),
                                     attn=torch.zeros(images.shape[0], 5, 2)),
     "expected (1, 6, heads)"),
    (lambda images, p: "features", "returned str"),
])
def test_a_function_of_the_wrong_shape_gets_one_line(tmp_path, returned, expected) -> None:
    with pytest.raises(LostregError) as caught:
        lostreg.evaluate(returned, patch_size=8, weights_of=(), data_root=tmp_path / "data",
                         output=tmp_path / "own", **COMMON)
    assert expected in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).startswith("function:")


# --- py: models on the command line -------------------------------------------------------------

FACTORY = '''
import timm
import torch
from torch import nn

import lostreg

KW = dict(depth=2, embed_dim=48, num_heads=6)


def build():
    return timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False,
                             dynamic_img_size=True, **KW)


def wrong_shape():
    model = build()
    return lostreg.UserModel(lambda images, p: model.forward_features(images), patch_size=14,
                             weights_of=model)


def fails():
    raise RuntimeError("no GPU found\\nsecond line")


def nothing():
    return None
'''


def write_factory(folder: Path, text: str = FACTORY) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "factory.py").write_text(text)
    return folder / "factory.py"


def error_lines(capsys) -> list[str]:
    """stderr without the warnings (the demo data root being created, a smoke run)."""
    return [line for line in capsys.readouterr().err.strip().splitlines()
            if not line.startswith("warning:")]


def cli(tmp_path: Path, model: str, *extra: str) -> list[str]:
    return ["--model", model, "--dataset", "demo", "--data-root", str(tmp_path / "data"),
            "--output", str(tmp_path / "runs"), "--limit", str(LIMIT), "--num-workers", "0",
            "--no-progress", *extra]


def test_a_py_factory_with_a_checkpoint_scores_as_the_named_backbone(tmp_path, capsys) -> None:
    """The training-loop checkpoint case: your architecture's factory, your weights file."""
    torch.save(tiny_vit(seed=3).state_dict(), tmp_path / "ckpt.pth")
    (named,) = named_run(tmp_path, tmp_path / "ckpt.pth")
    factory = write_factory(tmp_path / "code")
    assert main(cli(tmp_path, f"py:{factory}:build", "--weights", str(tmp_path / "ckpt.pth"))) == 0
    (own,) = (tmp_path / "runs").iterdir()
    assert predictions(own) == predictions(named)
    config = json.loads((own / "config.json").read_text())
    assert config["weights"]["source"] == "file" and config["plugin"]["source_sha256"]
    assert f"py:{factory}:build" in capsys.readouterr().out


@pytest.mark.parametrize("factory_name, expected", [
    ("wrong_shape", "returned features of shape (1, 11, 48); expected (1, 6, D)"),
    ("fails", "the factory fails() failed (RuntimeError: no GPU found)"),
    ("nothing", "the factory nothing() returned NoneType; expected an nn.Module"),
    ("missing", "has no function 'missing' (it defines build, fails, nothing, wrong_shape)"),
])
def test_a_bad_factory_gets_one_line_naming_it(tmp_path, capsys, factory_name, expected) -> None:
    factory = write_factory(tmp_path / "code")
    assert main(cli(tmp_path, f"py:{factory}:{factory_name}", "--weights", "random")) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and expected in err[0] and f"py:{factory}:{factory_name}" in err[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_py_names_that_cannot_be_imported_get_one_line(tmp_path, capsys) -> None:
    for model, expected in (("py:no_such_package_xyz.models:build",
                             "cannot import no_such_package_xyz.models (ModuleNotFoundError"),
                            (f"py:{tmp_path}/absent.py:build", "absent.py: file not found"),
                            ("py:factory", "expected py:package.module:factory"),
                            (f"py:{tmp_path}/f.py:build+ttr", "test-time registers")):
        (tmp_path / "f.py").write_text(FACTORY)
        assert main(cli(tmp_path, model)) == 2
        err = error_lines(capsys)
        assert len(err) == 1 and expected in err[0], (model, err)


def test_two_different_sources_or_weights_never_share_a_folder_or_a_cache_entry(tmp_path) -> None:
    """The same module twice: one folder (already finished). Another state, or the same
    weights from a factory file whose source differs: another folder and cache entry."""
    cache = tmp_path / "cache"
    kw = dict(data_root=tmp_path / "data", output=tmp_path / "runs", cache_features=cache,
              **COMMON)
    first = lostreg.evaluate(tiny_vit(seed=0), **kw)
    again = lostreg.evaluate(tiny_vit(seed=0), **kw)
    other = lostreg.evaluate(tiny_vit(seed=1), **kw)
    assert again.run_dirs == first.run_dirs and again.runs[0].status == "already finished"
    assert other.run_dirs != first.run_dirs
    assert len(list(cache.iterdir())) == 2
    factory = write_factory(tmp_path / "code")
    assert main(cli(tmp_path, f"py:{factory}:build", "--weights", "random")) == 0
    write_factory(tmp_path / "code", FACTORY + "\n# the same model, its source edited\n")
    assert main(cli(tmp_path, f"py:{factory}:build", "--weights", "random")) == 0
    smoke = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith("smoke-"))
    assert len(smoke) == 2
    hashes = {json.loads((tmp_path / "runs" / name / "config.json").read_text())["plugin"][
        "source_sha256"] for name in smoke}
    assert len(hashes) == 2


def test_a_factory_importing_timm_lazily_does_not_race_the_warm_start(tmp_path) -> None:
    """The run imports timm in a background thread; a factory that imports a timm submodule in
    its body met a partially initialised torchvision (4 failures in 4 tries before the factory
    was made to wait for the whole package). A fresh process, so timm is not yet imported."""
    (tmp_path / "lazy.py").write_text(
        "def build():\n"
        "    from timm.models.vision_transformer import VisionTransformer\n"
        "    return VisionTransformer(patch_size=16, embed_dim=48, depth=2, num_heads=6,\n"
        "                             dynamic_img_size=True)\n")
    for attempt in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "lostreg.run", *cli(tmp_path, f"py:{tmp_path}/lazy.py:build",
                                                        "--weights", "random", "--limit", "2"),
             "--output", str(tmp_path / f"runs{attempt}")],
            cwd=REPO, capture_output=True, text=True, timeout=600,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]


class LayersViT(nn.Module):
    """Patch tokens only, blocks in ``.layers``: a layout only a registered family can read."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed = nn.Conv2d(3, 24, 8, stride=8)
        self.layers = nn.ModuleList(Block(24, 2) for _ in range(2))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(images).flatten(2).transpose(1, 2)
        for layer in self.layers:
            tokens = layer(tokens)
        return tokens


@pytest.fixture
def layers_family():
    from lostreg.backbones.families import FAMILIES, ViTFamily, register_family

    class LayersFamily(ViTFamily):
        name = "layers_vit_test"

        def model_class(self):
            return LayersViT

        def blocks(self, model):
            return model.layers

        def num_prefix_tokens(self, model):
            return 0

        def has_class_token(self, model):
            return False

        def patch_embedding(self, model):
            return model.embed

        def forward(self, model, images):
            model(images)

    family = register_family(LayersFamily())
    yield family
    FAMILIES.remove(family)


def test_a_module_of_a_registered_family_is_read_by_that_family(tmp_path, layers_family) -> None:
    torch.manual_seed(0)
    module = LayersViT().eval()

    def keys(images: torch.Tensor, patch_size: int) -> torch.Tensor:
        seen = {}
        hook = module.layers[-1].attn.qkv.register_forward_hook(
            lambda m, a, out: seen.setdefault("qkv", out))
        try:
            module(images)
        finally:
            hook.remove()
        return seen["qkv"][:, :, 24:48]

    kw = dict(patch_size=8, data_root=tmp_path / "data", **COMMON)
    by_family = lostreg.evaluate(module, output=tmp_path / "family", **kw)
    by_function = lostreg.evaluate(keys, weights_of=module, output=tmp_path / "function", **kw)
    assert predictions(by_family.run_dirs[0]) == predictions(by_function.run_dirs[0])
    config = json.loads((by_family.run_dirs[0] / "config.json").read_text())
    assert config["plugin"]["adapter"] == "family" and config["feature"] == "k"
    with pytest.raises(LostregError, match="no class token"):
        lostreg.evaluate(module, method="dinoseg", output=tmp_path / "dinoseg", **kw)
