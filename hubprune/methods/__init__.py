"""The ways of making a model smaller: each scores the model on calibration text and removes what it can spare.

- depth (whole layers): ``scan.py`` scores every block of layers in one pass (``ScanResult.choose``
  picks the block); ``streamscan.py`` does the same layer by layer from the shards, for models larger
  than memory; ``sweep.py`` finds how many layers fit a quality budget by measuring. The cut itself is
  ``hubprune.architecture.surgery`` (in memory) or ``.filesurgery`` (files).
- width: ``width.py`` narrows every MLP to its most important neurons.
- sparsity: ``sparsity.py`` zeroes weights of the kept projections (unstructured or N:M, Wanda or magnitude).
"""
