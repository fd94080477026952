"""``python -m lostreg.protocol``: which LOST protocol produces which published number.

Published LOST figures for one backbone disagree because the papers measured under different
protocols (which feature and block, L2 normalisation or not, which Gram bias) and some report
the best of a grid chosen on the evaluation images. A protocol study runs a grid of settings for
one backbone on one dataset in one pass over the images (one forward per batch; every setting's
LOST on that batch's features) and writes, under ``results/protocol/<model>-<dataset>[-smoke]/``:

* ``protocol.csv``: one row per setting, CorLoc with its 95% bootstrap interval, its run id;
* ``protocol.md``: for each published figure of this backbone and dataset, the settings whose
  interval holds it; the best-of-grid score beside its selection protocol and the honest
  estimates of what it is worth (split-half and cross-dataset selection);
* ``selection.json``: the same selection figures, machine-readable;
* ``heatmap_<normalize>.png``, ``bias_curves.png`` and ``positions.png``.

Modules: ``grid`` (the settings and the pass), ``selection`` (best-of, split-half,
cross-dataset; pure), ``table`` (run folders -> hits matrix -> ``protocol.csv``), ``study``
(everything reported, and writing it), ``markdown``, ``figures``, ``cli``.
"""

from lostreg.reports.protocol.grid import (
    DEFAULT_POS_INTERP,
    L2_BIASES,
    POS_INTERPS,
    GridPoint,
    ProtocolGrid,
    pass_configs,
    run_passes,
)
from lostreg.reports.protocol.selection import (
    Choice,
    CrossChoice,
    SplitHalf,
    best_of_grid,
    cross_dataset,
    setting_corloc,
    split_half,
)
from lostreg.reports.protocol.table import (
    PROTOCOL_COLUMNS,
    bootstrap_cis,
    load_grid_runs,
    points_of,
    protocol_frame,
    read_protocol_csv,
)


def main(argv=None) -> int:
    """``lostreg protocol ...`` (see ``lostreg.reports.protocol.cli``)."""
    from lostreg.reports.protocol.cli import main as cli_main

    return cli_main(argv)


__all__ = [
    "DEFAULT_POS_INTERP", "L2_BIASES", "POS_INTERPS", "PROTOCOL_COLUMNS", "Choice",
    "CrossChoice", "GridPoint", "ProtocolGrid", "SplitHalf", "best_of_grid", "bootstrap_cis",
    "cross_dataset", "load_grid_runs", "main", "pass_configs",
    "points_of", "protocol_frame", "read_protocol_csv", "run_passes", "setting_corloc",
    "split_half",
]
