"""Healing a pruned model: train it to behave like its original again.

- ``lora.py``: ``heal_model``, LoRA (or QLoRA) on the kept layers, optionally distilled from the
  original; checkpoints and resume. ``PrunedModel.heal`` and ``hubprune heal`` call it.
- ``refit.py``: the closed-form repair of the layer before each gap, done before LoRA.
- ``data.py``: what healing reads: prose, or conversations the original writes (Magpie self-data).
- ``folder.py``: ``heal_folder``, a pruned folder healed into a new one (``hubprune heal``).
- ``qlora.py``: QLoRA on a pruned folder that is never held in full precision; ``fourbit.py`` loads
  in 4-bit NF4; ``merge.py`` merges the adapter into the safetensors shards at file level.
"""
