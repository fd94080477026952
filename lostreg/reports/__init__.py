"""Reports: what is built from finished runs, never below them.

* ``leaderboard``: every finished run in one table, register pairs compared;
* ``protocol``: which LOST protocol produces which published number;
* ``analysis``: artifact diagnostics (token norms, failure attribution, visual reports).
"""
