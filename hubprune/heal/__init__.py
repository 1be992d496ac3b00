"""Healing a pruned model: train it to behave like its original again.

- ``lora.py``: ``heal_model``, LoRA (or QLoRA) on the kept layers, optionally distilled from the
  original; checkpoints and resume. ``PrunedModel.heal`` and ``hubprune heal`` call it.
- ``refit.py``: the closed-form repair of the layer before each gap, done before LoRA.
- ``data.py``: what healing reads: prose, or conversations the original writes (Magpie self-data).
- ``folder.py``: ``heal_folder``, a pruned folder healed into a new one (``hubprune heal``).
- ``qlora.py``: QLoRA on a pruned folder that is never held in full precision; ``fourbit.py`` loads
  in 4-bit NF4; ``merge.py`` merges the adapter into the safetensors shards at file level.
"""

import logging


class _NoHubKernelNotice(logging.Filter):
    """peft imports bitsandbytes, which on a CPU with AVX512-BF16 asks the Hub for an optional
    4-bit kernel and, offline or where the publisher is not trusted, logs a warning telling the user
    to ``pip install kernels`` (installed already). It then uses its own kernel; LoRA healing does
    not use 4-bit at all. This filter drops that one line and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoHubKernelNotice())
