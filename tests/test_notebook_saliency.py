"""Issue 19 item 6: the notebook's saliency section runs headless on a folder of mask runs
only (the box sections before it then show nothing and stop nothing): the table of mask
runs, the comparison with the anchors, the paired statistics and the pair table above the
overlays all appear. (Beside box runs it runs in ``test_notebook.py``'s folders too: there it
says there are no mask runs.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from mask_run_folders import REG, write_mask_run
from test_notebook import execute


def test_the_saliency_section_on_mask_runs_only(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    write_mask_run(runs, "smoke-base", [(i % 5) - 2 for i in range(10)], smoke=True,
                   data_root=tmp_path / "data", write_images=True)
    write_mask_run(runs, "smoke-reg", [(i % 3) - 1 for i in range(10)], smoke=True,
                   data_root=tmp_path / "data", **REG)
    text = execute(runs, monkeypatch)
    assert "Only SMOKE runs" in text and "2 mask runs from" in text
    assert "## Saliency (masks): without → with registers" in text
    assert "### Saliency runs not comparable with published figures" in text
    assert "80.3 / 71.2 / 91.8" in text  # the anchors are listed
    assert "| tokencut | none | dinov2_vits14 → dinov2_vits14_reg4 | trained registers |" in text
    assert "mean_abs_iou_change" in text  # the pair table above the overlays
    assert "no register pairs among the runs" in text  # the box sections: nothing to show
