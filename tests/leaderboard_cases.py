"""A small, fixed set of run folders that exercises every path of the leaderboard: register
pairs (trained and test-time), a pair whose image lists differ, ``--limit`` and partial-dataset
runs, two runs of one identity (the newest wins), a smoke run, singles a paper cites, and
another method. ``tests/fixtures/leaderboard_0b4749c`` holds the outputs the leaderboard
wrote for these folders at commit 0b4749c (before per-run summaries), byte for byte:

    PYTHONPATH=tests python -c "from leaderboard_cases import write_golden; write_golden()"

(run at that commit; ``write_golden`` writes the fixture folder)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from run_folders import REG, TTR, write_run

HERE = Path(__file__).parent
GOLDEN = HERE / "fixtures" / "leaderboard_0b4749c"
FIXTURE_RUNS = HERE / "fixtures" / "runs_6415c89"
OUTPUTS = ("leaderboard.csv", "comparison.csv", "comparison.md")
# what the leaderboard gained after 0b4749c for mask runs (issue 19): columns a box run leaves
# empty, and the saliency part appended to comparison.md; ``corloc_part`` takes them out, so
# the CorLoc outputs are still compared with 0b4749c's byte for byte
SALIENCY_COLUMNS = ("refine", "mask_protocol", "acc", "iou", "max_f")
SALIENCY_PART = "\n## Saliency (masks)"


def corloc_part(name: str, data: bytes) -> bytes:
    """``data`` of output ``name`` without the saliency columns (each empty for a box run) and
    without comparison.md's saliency part."""
    import csv
    import io

    if name == "comparison.md":
        return data.decode("utf-8").split(SALIENCY_PART)[0].encode("utf-8")
    if name != "leaderboard.csv":
        return data
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    keep = [i for i, column in enumerate(rows[0]) if column not in SALIENCY_COLUMNS]
    assert all(row[i] == "" for row in rows[1:] for i in range(len(row)) if i not in keep)
    out = io.StringIO(newline="")
    csv.writer(out, lineterminator="\n").writerows([[row[i] for i in keep] for row in rows])
    return out.getvalue().encode("utf-8")
DINO = {"model": "dino_vits16", "timm_name": "vit_small_patch16_224.dino", "family": "dino"}


def _hits(seed: int, n: int, rate: float) -> list[bool]:
    return [bool(v) for v in np.random.default_rng(seed).random(n) < rate]


def _partial(run_dir: Path, images: int) -> None:
    """Mark a folder as a run on a partial dataset (its identity records the image count)."""
    path = run_dir / "config.json"
    config = json.loads(path.read_text())
    config["identity"]["dataset_images"] = images
    path.write_text(json.dumps(config))


def write_cases(root: Path) -> Path:
    """The run folders under ``root`` (returned)."""
    n = 60
    write_run(root, "v2-base", _hits(1, n, 0.4))
    write_run(root, "v2-reg", _hits(2, n, 0.6), **REG)
    write_run(root, "v2-ttr", _hits(3, n, 0.5), **TTR)
    write_run(root, "v2-reg-older", _hits(4, n, 0.1), finished="2025-12-01T00:00:00+00:00",
              **REG)
    write_run(root, "v2-base-l2", _hits(5, n, 0.45), normalize="l2")
    write_run(root, "v2-reg-l2", _hits(6, n, 0.55), normalize="l2", **REG)
    ids = [f"{i:06d}" for i in range(n)]
    write_run(root, "dino-base-voc12", _hits(7, n, 0.6), dataset="voc12", image_ids=ids, **DINO)
    write_run(root, "dino-tokencut", _hits(8, n, 0.7), method="tokencut",
              method_params={"tau": 0.2, "eps": 1e-5, "binary_graph": True}, **DINO)
    # a pair whose image lists differ: joined on image_id, 'Images' says of how many
    write_run(root, "v2-coco-base", _hits(9, n, 0.3), dataset="coco20k", image_ids=ids)
    write_run(root, "v2-coco-reg", _hits(10, n - 6, 0.5), dataset="coco20k",
              image_ids=ids[3:n - 3][::-1], **REG)
    write_run(root, "v2-limit-base", _hits(11, 20, 0.3), limit=20)
    write_run(root, "v2-limit-reg", _hits(12, 20, 0.6), limit=20, **REG)
    _partial(write_run(root, "v2-partial-base", _hits(13, 12, 0.5), dataset="voc12"), 12)
    _partial(write_run(root, "v2-partial-reg", _hits(14, 12, 0.7), dataset="voc12", **REG), 12)
    write_run(root, "smoke-v2", _hits(15, n, 0.2), smoke=True)
    write_run(root, "unfinished", _hits(16, 5, 0.5), finish=False)
    return root


def build(runs: Path, out: Path, include_smoke: bool = False) -> str:
    """The leaderboard of ``runs`` written to ``out``; returns its summary line."""
    from lostreg.reports import leaderboard as lb

    board = lb.collect(runs, include_smoke, report=None)
    lb.write_outputs(board, out)
    return lb.summary_line(lb.build_summary(board), Path("OUT"))


def write_golden() -> None:
    """Write the fixture folder: the outputs for ``write_cases`` and for the 6415c89 runs."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = {"generated": (write_cases(tmp / "runs"), False),
                 "runs_6415c89": (FIXTURE_RUNS, True)}
        for name, (runs, smoke) in cases.items():
            target = GOLDEN / name
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            line = build(runs, tmp / name, include_smoke=smoke)
            for output in OUTPUTS:
                shutil.copyfile(tmp / name / output, target / output)
            (target / "summary.txt").write_text(line + "\n")
