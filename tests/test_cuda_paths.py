"""Code paths that only a GPU takes, checked on the CPU with mocks: which GPU a run makes
current, how a pinned batch reaches it, what ``--device cuda:N`` accepts, and what the
extraction benchmark keeps on the device."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lostreg import run
from lostreg.errors import LostregError
from lostreg.runs import grid

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import bench_cache, bench_extraction, bench_memory, bench_precision  # noqa: E402
from benchmarks.common import sample_sizes, write_voc_tree  # noqa: E402
from lostreg.backbones import BackboneSpec, create_backbone  # noqa: E402

TINY = BackboneSpec("tiny_cuda_paths", "vit_small_patch14_dinov2.lvd142m", "dinov2", 14, 0,
                    pos_embed="dinov2", model_kwargs=dict(depth=2, embed_dim=32, num_heads=2))


class Stop(Exception):
    pass


@pytest.fixture
def restore_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_cuda_index_is_checked_against_the_machine(two_gpus) -> None:
    assert run.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert run.resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(LostregError, match="2 CUDA device"):
        run.resolve_device("cuda:2")
    with pytest.raises(LostregError, match="expected auto, cpu or cuda"):
        run.resolve_device("cuda:one")


def test_run_makes_its_gpu_current_before_any_cuda_work(monkeypatch, tmp_path, two_gpus) -> None:
    """With ``--device cuda:1`` the DataLoader's pin-memory thread pins on the current device;
    unless the run makes cuda:1 current, every run also opens a context on GPU 0."""
    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))

    def stop(precision: str) -> dict:  # the run's first step after choosing its device
        raise Stop

    monkeypatch.setattr(grid, "set_numerics", stop)
    with pytest.raises(Stop):
        run.run_benchmark(run.RunConfig(model="dinov2_vits14", dataset="demo", device="cuda:1",
                                        data_root=tmp_path, output=tmp_path / "runs"))
    assert current == [torch.device("cuda", 1)]
    current.clear()
    run.use_device(torch.device("cpu"))
    run.use_device(torch.device("cuda"))  # no index: the current device is the one meant
    assert current == []


def test_the_loader_pins_each_stacked_batch(monkeypatch) -> None:
    """Workers stack a batch by shape; the DataLoader's pin-memory thread must then pin those
    stacks (not the per-image tensors), so one asynchronous copy moves each to the GPU."""
    from torch.utils.data._utils.pin_memory import pin_memory as loader_pin

    pinned: list[tuple[int, ...]] = []

    def fake_pin(self, *args, **kwargs):
        pinned.append(tuple(self.shape))
        return self.clone()

    items = [{"position": i, "tensor": torch.full((3, 14, 28 if i % 2 else 14), float(i)),
              "size": (14, 14), "error": None} for i in range(5)]
    loaded = run.collate_by_shape(items)
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    out = loader_pin(loaded)
    monkeypatch.undo()
    assert isinstance(out, run.LoadedBatch)
    assert sorted(pinned) == [(2, 3, 14, 28), (3, 3, 14, 14)]
    assert [g.positions for g in out.groups] == [[0, 2, 4], [1, 3]]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda-paths")
    index = write_voc_tree(root / "data", sample_sizes(3, seed=5, scale=0.1), seed=5)
    return index, create_backbone(TINY, "random", torch.device("cpu"))


def test_extraction_baseline_keeps_no_batch_output_alive(tiny_setup) -> None:
    index, backbone = tiny_setup
    batches = bench_extraction.prepare_batches(index, backbone, 2)
    for mode in ("timm", "qkv"):
        for out in bench_extraction.forward_loop(batches, backbone, torch.device("cpu"), "fp32",
                                                 mode):
            assert out.untyped_storage().nbytes() == out.numel() * out.element_size(), mode


def test_extraction_baseline_runs_under_the_runs_numerics(monkeypatch, tiny_setup, tmp_path,
                                                          restore_tf32) -> None:
    """cuDNN's TF32 is on by default: the first timed forward must not have it while the run
    (``set_numerics``) does not."""
    index, backbone = tiny_setup
    seen: list[tuple[bool, bool]] = []

    def record(*args, **kwargs):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        raise Stop

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    monkeypatch.setattr(bench_extraction, "forward_loop", record)
    with pytest.raises(Stop):
        bench_extraction.measure(index, backbone, torch.device("cpu"), tmp_path, batch_size=2,
                                 num_workers=0, check=False)
    assert seen == [(False, False)]


def test_gpu_start_up_is_paid_before_the_first_timed_run(monkeypatch, tiny_setup, tmp_path) -> None:
    """CUDA, cuBLAS and cuDNN start once per process: untreated, the first timed run (the
    cache-writing run, the fp32 run) alone would pay for it and skew the ratios."""
    index, backbone = tiny_setup
    order: list[str] = []

    def timed(fn, device):
        order.append("timed")
        raise Stop

    for module in (bench_cache, bench_precision):
        monkeypatch.setattr(module, "warm_up", lambda device: order.append("warm_up"))
        monkeypatch.setattr(module, "timed", timed)
    config = bench_cache.cache_config(index, "dinov2_vits14", "random", "cpu", tmp_path, 2,
                                      "fp32", 0)
    with pytest.raises(Stop):
        bench_cache.measure(index, config, check=False)
    with pytest.raises(Stop):
        bench_precision.measure(index, backbone, tmp_path, "cpu", num_workers=0)
    assert order == ["warm_up", "timed", "warm_up", "timed"]


def test_memory_benchmark_reports_the_gpu_peak(monkeypatch) -> None:
    asked: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated",
                        lambda device: asked.append(device) or 3 * 2**20)
    assert bench_memory.gpu_peak("cuda:1") == {"gpu_peak_mib": 3.0}
    assert asked == [torch.device("cuda", 1)]
    assert bench_memory.gpu_peak("cpu") == {}
