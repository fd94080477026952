"""Artifact diagnostics (Darcet et al., "Vision Transformers Need Registers", ICLR 2024).

* :mod:`~lostreg.reports.analysis.norms`: pure statistics (token norms, threshold split, outlier maps,
  neighbour similarity);
* :mod:`~lostreg.reports.analysis.tokens`: what is read out of the model (block outputs, input patch
  embedding, prefix-token attention);
* :mod:`~lostreg.reports.analysis.store`: compact per-token maps (``tokens.npz``);
* :mod:`~lostreg.reports.analysis.collect`: the ``norms`` analysis over a dataset;
* :mod:`~lostreg.reports.analysis.runs`: reading run folders (method, parameters, features) and
  rebuilding their model; labels of several runs;
* :mod:`~lostreg.reports.analysis.attribution`: failures joined with outlier maps; which of several
  runs found each object;
* :mod:`~lostreg.reports.analysis.report`: per-image panels and ``index.html``;
* :mod:`~lostreg.reports.analysis.compare`: several runs' boxes and masks side by side;
* :mod:`~lostreg.reports.analysis.masks`: mask runs (saliency): the stored mask, the GT checked
  against the run's counts, which tokens fall inside a mask, how masks are drawn;
* :mod:`~lostreg.reports.analysis.mask_report` and
  :mod:`~lostreg.reports.analysis.mask_attribution`: ``show`` and ``attribution`` on mask runs;
* :mod:`~lostreg.reports.analysis.plots`: figure helpers (text that fits, plain ticks, smoke mark).
* :mod:`~lostreg.reports.analysis.marks`: the words every output carries about its run (smoke,
  unfinished).

CLI: ``python -m lostreg.analyze <norms|attribution|show>``.
"""
