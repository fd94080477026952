"""What the data needed is counted in metrics.json and warned about once per pass."""

from __future__ import annotations

import json
from pathlib import Path

from lostreg.datasets import load_dataset
from lostreg.run import main


def cli(root: Path, *extra: str) -> list[str]:
    return ["--model", "timm:vit_tiny_patch16_224", "--weights", "random", "--dataset", "demo",
            "--data-root", str(root / "data"), "--output", str(root / "runs"),
            "--num-workers", "0", "--no-progress", "--limit", "6", *extra]


def test_wrong_sizes_and_clipped_boxes_are_counted_and_warned_once(tmp_path, capsys) -> None:
    index = load_dataset("demo", tmp_path / "data")
    lying = index.records[2]
    xml = index.root / "Annotations" / f"{lying.image_id}.xml"
    text = xml.read_text()
    xml.write_text(text.replace(f"<width>{lying.width}</width>",
                                f"<width>{lying.width + 40}</width>"))
    outside = index.records[4]
    xml = index.root / "Annotations" / f"{outside.image_id}.xml"
    xml.write_text(xml.read_text().replace("<xmax>", "<xmax>9", 1))  # far beyond the image
    capsys.readouterr()
    assert main(cli(tmp_path, "--gram-bias=0,0.1")) == 0  # two runs, one pass
    err = capsys.readouterr().err
    mismatch = [line for line in err.splitlines() if "decode to another size" in line]
    assert len(mismatch) == 1 and lying.image_id in mismatch[0], err
    assert len([line for line in err.splitlines() if "were clipped to it" in line]) == 1, err
    for run_dir in (tmp_path / "runs").iterdir():
        checks = json.loads((run_dir / "metrics.json").read_text())["data_checks"]
        assert checks["image_size_mismatch"] == 1 and checks["boxes_clipped"] == 1
        assert lying.image_id in checks["first"]["image_size_mismatch"]
    capsys.readouterr()
    assert main(cli(tmp_path, "--gram-bias=0,0.1")) == 0  # finished: nothing to warn again
    assert "decode to another size" not in capsys.readouterr().err
