"""Loading a checkpoint straight into 4-bit NF4 (bitsandbytes): the QLoRA student and teacher."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from hubprune.loading import NO_HUB_KERNELS

logger = logging.getLogger(__name__)


def load_4bit(source: str | os.PathLike, device: torch.device, *, revision: str | None = None) -> nn.Module:
    """Load a checkpoint (folder or Hub id) straight into 4-bit NF4 on ``device``: bf16 compute, double quant.

    Each tensor is quantized as it is read; the full-precision model never exists.

    Example: ``model = load_4bit("llama-70b-44l", torch.device("cuda", 0))``
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    target = device.index if device.type == "cuda" and device.index is not None else str(device)
    logger.info("loading %s in 4-bit NF4 on %s", source, device)
    return AutoModelForCausalLM.from_pretrained(
        os.fspath(source),
        quantization_config=quantization,
        device_map={"": target},
        revision=revision,
        **NO_HUB_KERNELS,
    )
