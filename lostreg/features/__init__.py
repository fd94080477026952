"""Features: image files -> padded batches on the device -> the feature maps methods read.

* ``extract``: the image protocol (LOST's: no resize, zero padding) and reading q/k/v (or the
  class token's attention) of any block with hooks in the model's own forward;
* ``pipeline``: decoding in workers, batches of one padded size, the device, the lazily built
  backbone and the ``FeatureSource`` that serves a pass from the model or the cache;
* ``cache``: per-image features on disk, so a rerun with other method settings skips the model.
"""
