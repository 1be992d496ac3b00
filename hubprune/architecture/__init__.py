"""Where a model keeps its layers, and cutting whole layers out of it.

- ``families.py``: the decoder stack, final norm and LoRA targets of any causal LM, found in its
  module tree (``family_of``); ``OVERRIDES`` and ``REFUSED`` hold the exceptions.
- ``perlayer.py``: tensors outside the decoder layers that hold one block per layer (Gemma's PLE).
- ``surgery.py``: the cut in memory: drop layers, slice the config, renumber ``layer_idx``.
- ``filesurgery.py``: the same cut at file level, from safetensors shards, without loading the model.
"""
