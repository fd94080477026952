"""Evaluation: ground truth and predictions in, per-image scores and their aggregate out.

* ``corloc``: box IoU and CorLoc;
* ``stats``: intervals and paired tests over per-image scores.
"""
