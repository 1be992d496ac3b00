"""Per-layer input embeddings (Gemma 3n/4 "PLE"): tensors outside the decoder layers that hold one block per layer.

A Gemma 4 text model with ``hidden_size_per_layer_input = d`` keeps ``embed_tokens_per_layer``
(``[vocab, num_layers * d]``) and ``per_layer_model_projection`` (``[num_layers * d, hidden]``) beside
its layers; layer ``i`` reads columns (rows) ``i*d : (i+1)*d``. A cut keeps the kept layers' blocks,
in memory (``cut_per_layer_tensors``) and in a safetensors file (``per_layer_dim``, ``copy_blocks``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
_CHUNK = 64 << 20  # bytes read at a time


def per_layer_width(config) -> int | None:
    """``hidden_size_per_layer_input`` of the text config, where the model has per-layer input embeddings."""
    width = vars(config.get_text_config()).get("hidden_size_per_layer_input")
    return width if isinstance(width, int) and width > 0 else None


def per_layer_dim(name: str, shape: Sequence[int], num_layers: int, width: int | None) -> int | None:
    """The dimension of tensor ``name`` that holds one ``width`` block per layer, or None."""
    if not width or "per_layer" not in name:
        return None
    dims = [d for d, size in enumerate(shape) if size == num_layers * width]
    return dims[0] if len(dims) == 1 else None


def cut_per_layer_tensors(model: nn.Module, kept: Sequence[int], num_layers: int, layers_path: str) -> list[str]:
    """Keep the kept layers' blocks of every per-layer tensor of ``model`` outside ``layers_path``; the names cut.

    Each cut tensor is a new one (the original model's tensors are not touched)."""
    width = per_layer_width(model.config)
    cut: list[str] = []
    if width is None:  # no per-layer input embeddings
        return cut
    for path, module in model.named_modules():
        if path == layers_path or path.startswith(layers_path + "."):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            dim = per_layer_dim(f"{path}.{name}", param.shape, num_layers, width)
            if dim is None:
                continue
            index = torch.tensor([i * width + k for i in kept for k in range(width)], device=param.device)
            setattr(module, name, nn.Parameter(param.detach().index_select(dim, index), param.requires_grad))
            for attribute in ("embedding_dim", "out_features", "in_features"):
                if getattr(module, attribute, None) == num_layers * width:
                    setattr(module, attribute, len(kept) * width)
            cut.append(f"{path}.{name}")
    return cut


def blocks_shape(shape: Sequence[int], dim: int, num_layers: int, kept: Sequence[int]) -> list[int]:
    """The shape of a per-layer tensor after the cut."""
    return [size // num_layers * len(kept) if d == dim else size for d, size in enumerate(shape)]


def copy_blocks(f_in, f_out, offset: int, info: dict, dim: int, num_layers: int, kept: Sequence[int]) -> int:
    """Append the kept layers' blocks of the tensor at ``offset`` of ``f_in`` to ``f_out``; the bytes written.

    Read in chunks of whole rows (everything before ``dim``), so memory stays bounded."""
    shape = info["shape"]
    itemsize = _ITEMSIZE.get(info["dtype"], 1)
    rows = math.prod(shape[:dim])
    block = shape[dim] // num_layers * math.prod(shape[dim + 1 :]) * itemsize  # bytes of one layer's block per row
    row = block * num_layers
    step = max(1, _CHUNK // max(row, 1))
    written = 0
    f_in.seek(offset)
    for start in range(0, rows, step):
        count = min(step, rows - start)
        data = np.frombuffer(f_in.read(count * row), dtype=np.uint8).reshape(count, num_layers, block)
        out = np.ascontiguousarray(data[:, list(kept)]).tobytes()
        f_out.write(out)
        written += len(out)
    return written
