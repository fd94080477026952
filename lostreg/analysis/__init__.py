"""Artifact diagnostics (Darcet et al., "Vision Transformers Need Registers", ICLR 2024).

* :mod:`~lostreg.analysis.norms`: pure statistics (token norms, threshold split, outlier maps,
  neighbour similarity);
* :mod:`~lostreg.analysis.tokens`: what is read out of the model (block outputs, input patch
  embedding, prefix-token attention);
* :mod:`~lostreg.analysis.store`: compact per-token maps (``tokens.npz``);
* :mod:`~lostreg.analysis.collect`: the ``norms`` analysis over a dataset;
* :mod:`~lostreg.analysis.attribution`: LOST failures joined with outlier maps;
* :mod:`~lostreg.analysis.report`: per-image panels and ``index.html``.

CLI: ``python -m lostreg.analyze <norms|attribution|show>``.
"""
