"""Runs: the one owner of the run folder, from settings to the files a run leaves.

* ``config``: what one run is (``RunConfig``);
* ``folder``: a run's identity, folder name, resume and ``config.json``/``metrics.json``;
* ``predictions``: ``predictions.jsonl``, written and read back validated;
* ``lock``: one writer per run folder; ``distributed``: several processes on one run;
* ``sweep``: one pass of a backbone over a dataset serving every run that shares it.
"""
