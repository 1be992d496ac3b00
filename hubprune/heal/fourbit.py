"""4-bit NF4 (bitsandbytes) for QLoRA: whether it runs here, loading a checkpoint straight into 4-bit
(the QLoRA student and teacher), and a 4-bit copy of a model in memory."""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile

import torch
from torch import nn

from hubprune.loading import NO_HUB_KERNELS

logger = logging.getLogger(__name__)


def require_qlora(device: torch.device | None = None) -> None:
    """Raise ValueError, saying what to use instead, where QLoRA cannot run: it runs where bitsandbytes runs
    4-bit NF4, a CUDA GPU, or the CPU with a build that has CPU kernels."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            "heal.method qlora needs the bitsandbytes package (pip install 'hubprune[qlora]'); "
            "use method: lora without it"
        )
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not _nf4_on_cpu():
        raise ValueError(
            "heal.method qlora needs a CUDA GPU here: this bitsandbytes cannot run 4-bit NF4 on the "
            "CPU (bitsandbytes 0.50.2 can); use method: lora on a CPU, or upgrade bitsandbytes"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"heal.method qlora runs on a CUDA GPU or the CPU, not on {device}; use method: lora there")


def _nf4_on_cpu() -> bool:
    try:
        import bitsandbytes.functional as bnb

        packed, state = bnb.quantize_4bit(torch.ones(64, dtype=torch.bfloat16), quant_type="nf4")
        return bool(torch.allclose(bnb.dequantize_4bit(packed, state).float(), torch.ones(64)))
    except Exception as err:  # no CPU kernels in this build, or an old release
        logger.info("bitsandbytes cannot quantize to NF4 on the CPU: %s", err)
        return False


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


def is_4bit(model: nn.Module) -> bool:
    """True for a model loaded in 4-bit (``load_4bit``)."""
    return bool(getattr(model, "is_loaded_in_4bit", False))


def quantized_copy(model: nn.Module) -> nn.Module:
    """QLoRA's student: the (pruned) weights in 4-bit NF4 with bf16 compute, ready for k-bit training. A model
    already loaded in 4-bit (``load_4bit``) is used as it is; otherwise it is saved and reloaded in 4-bit."""
    from peft import prepare_model_for_kbit_training

    if not is_4bit(model):
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)  # type: ignore[operator]  # a transformers model
            device = (
                torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
            )
            model = load_4bit(tmp, device)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
