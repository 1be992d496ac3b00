"""The memory plan: will every model's weights and KV cache fit, before anything starts?

Per model: weights (parameters x bytes per parameter of the serving dtype or quantization)
+ KV cache (2 x layers x KV heads x head dim x bytes x context x concurrent sequences)
+ the engine's runtime overhead, against the GPU's free memory (torch.cuda.mem_get_info)
or the available RAM (psutil). A plan that does not fit is refused with what would fit.

Example::

    plan = plan_memory([ModelSpec(path="out/smollm2-24l")], {"smollm2-24l": "out/smollm2-24l"}, engine="vllm")
    print(plan.table()); plan.check()
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, replace
from pathlib import Path

from hubprune.server.config import ModelSpec

GiB = 2**30
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_QUANT_BYTES = {"8bit": 1.0, "fp8": 1.0, "4bit": 0.5, "bitsandbytes": 0.5}  # plus the few layers kept in 16 bits
# Engine runtime beside weights and KV cache: a vLLM process (Python, torch, CUDA context or
# CPU worker; ~2.3 GiB measured on CPU), or activations of the embedded engine.
_VLLM_RUNTIME = {"gpu": 1.0 * GiB, "cpu": 2.5 * GiB}


class MemoryPlanError(ValueError):
    """The models do not fit; the message says what would."""


@dataclass
class ModelFacts:
    """What the plan reads from a folder: config.json and the safetensors headers."""

    num_layers: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    dtype: str
    max_position_embeddings: int
    params: int
    file_bytes: int
    sliding_layers: int = 0
    sliding_window: int | None = None


def model_facts(folder: str | Path) -> ModelFacts:
    """Read a transformers folder's shape. Example: ``model_facts("out/smollm2-24l").num_layers == 24``."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    text = {**config, **config.get("text_config", {})}
    heads = text["num_attention_heads"]
    layer_types = text.get("layer_types") or []
    params, size = 0, 0
    for file in folder.glob("*.safetensors"):
        with file.open("rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        params += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
        size += file.stat().st_size
    return ModelFacts(
        num_layers=text["num_hidden_layers"],
        kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=text.get("head_dim") or text["hidden_size"] // heads,
        hidden_size=text["hidden_size"],
        intermediate_size=text.get("intermediate_size") or 4 * text["hidden_size"],
        dtype=str(text.get("dtype") or text.get("torch_dtype") or "float32"),
        max_position_embeddings=text.get("max_position_embeddings") or 2048,
        params=params,
        file_bytes=size,
        sliding_layers=sum(t == "sliding_attention" for t in layer_types),
        sliding_window=text.get("sliding_window"),
    )


@dataclass
class ModelMemory:
    """One row of the plan, in bytes."""

    name: str
    engine: str
    dtype: str
    facts: ModelFacts
    max_model_len: int
    max_num_seqs: int
    bytes_per_param: float | None  # None: pre-quantized weights, counted as their file size
    runtime: float
    kv_granularity: int = 1  # vLLM on CPU reserves its KV cache in whole GiB

    @property
    def weights(self) -> float:
        if self.bytes_per_param is None:
            return float(self.facts.file_bytes)
        return self.facts.params * self.bytes_per_param

    @property
    def kv(self) -> float:
        f = self.facts
        tokens = self.max_model_len * (f.num_layers - f.sliding_layers)
        if f.sliding_layers:
            tokens += min(self.max_model_len, f.sliding_window or self.max_model_len) * f.sliding_layers
        kv_bytes = 2 * f.kv_heads * f.head_dim * _BYTES.get(self.dtype, 2) * tokens * self.max_num_seqs
        return math.ceil(kv_bytes / self.kv_granularity) * self.kv_granularity

    @property
    def total(self) -> float:
        return self.weights + self.kv + self.runtime


@dataclass
class MemoryPlan:
    """Every model's memory against what the device has. ``check()`` refuses a plan that does not fit."""

    models: list[ModelMemory]
    usable: float
    where: str
    on_gpu: bool
    device_total: float = 0.0  # the GPU's whole memory (vLLM's --gpu-memory-utilization is a share of it)

    @property
    def need(self) -> float:
        return sum(m.total for m in self.models)

    @property
    def fits(self) -> bool:
        return self.need <= self.usable

    def table(self) -> str:
        head = (
            f"{'model':<24} {'engine':<12} {'dtype':<9} {'params':>8} {'weights':>9} {'KV cache':>9} "
            f"{'(context x seqs)':<17} {'runtime':>8} {'total':>9}"
        )
        rows = [head]
        for m in self.models:
            rows.append(
                f"{m.name[:24]:<24} {m.engine:<12} {m.dtype:<9} {m.facts.params / 1e6:>7.1f}M "
                f"{_gib(m.weights):>9} {_gib(m.kv):>9} {f'({m.max_model_len} x {m.max_num_seqs})':<17} "
                f"{_gib(m.runtime):>8} {_gib(m.total):>9}"
            )
        verdict = "fits" if self.fits else "DOES NOT FIT"
        rows.append(f"total {_gib(self.need)} of {_gib(self.usable)} usable ({self.where}): {verdict}")
        return "\n".join(rows)

    def shares(self) -> dict[str, float]:
        """Each model's share of the usable memory, in proportion to its need (vLLM's memory fractions)."""
        return {m.name: m.total / self.need for m in self.models} if self.need else {}

    def check(self) -> None:
        if self.fits:
            return
        raise MemoryPlanError(
            f"the models need {_gib(self.need)} but {_gib(self.usable)} is usable ({self.where}); nothing was "
            "started. What would fit:\n  - " + "\n  - ".join(self.suggestions()) + f"\n\n{self.table()}"
        )

    def suggestions(self) -> list[str]:
        out = []
        for k in range(len(self.models) - 1, 0, -1):
            subset = self.models[:k]
            if sum(m.total for m in subset) <= self.usable:
                out.append(f"fewer models: {', '.join(m.name for m in subset)} ({_gib(sum(m.total for m in subset))})")
                break
        longest = max(m.max_model_len for m in self.models)
        length = 2 ** (longest.bit_length() - 1) if longest & (longest - 1) else longest // 2
        while length >= 128:
            trial = [replace(m, max_model_len=min(m.max_model_len, length)) for m in self.models]
            if sum(m.total for m in trial) <= self.usable:
                out.append(f"a shorter context: max_model_len {length} ({_gib(sum(m.total for m in trial))})")
                break
            length //= 2
        if any(m.max_num_seqs > 1 for m in self.models):
            trial = [replace(m, max_num_seqs=1) for m in self.models]
            if sum(m.total for m in trial) <= self.usable:
                out.append(f"fewer concurrent sequences: max_num_seqs 1 ({_gib(sum(m.total for m in trial))})")
        for bits, q in ((8, "8bit"), (4, "4bit")):
            trial = [replace(m, bytes_per_param=_QUANT_BYTES[q]) for m in self.models]
            if sum(m.total for m in trial) <= self.usable:
                where = "" if self.on_gpu else "; needs a CUDA GPU"
                out.append(f"{bits}-bit weights: quantization {q} ({_gib(sum(m.total for m in trial))}{where})")
                break
        return out or [
            "nothing short of more memory: even one model with a 128-token context and 4-bit weights does not fit"
        ]


def plan_memory(
    specs: list[ModelSpec],
    folders: dict[str, str],
    *,
    engine: str,
    on_gpu: bool,
    gpu_index: int = 0,
    gpu_memory_utilization: float = 0.9,
    budget: int | None = None,
) -> MemoryPlan:
    """Plan the memory of ``specs`` (loaded from ``folders``) for ``engine`` ("transformers" or "vllm")."""
    rows = []
    for spec in specs:
        if spec.url:
            continue  # served elsewhere
        facts = model_facts(folders[spec.name])
        dtype = spec.dtype if spec.dtype != "auto" else (facts.dtype if on_gpu else "float32")
        dtype = dtype if dtype in _BYTES else "bfloat16"
        per_param = _QUANT_BYTES.get(spec.quantization) if spec.quantization else _BYTES[dtype]
        length = min(spec.max_model_len or facts.max_position_embeddings, facts.max_position_embeddings)
        if engine == "vllm":
            runtime, seqs = _VLLM_RUNTIME["gpu" if on_gpu else "cpu"], spec.max_num_seqs
        else:  # batches of up to max_num_seqs; activations of a full-context prefill of each
            seqs = spec.max_num_seqs
            runtime = 0.25 * GiB + seqs * length * (facts.intermediate_size + 4 * facts.hidden_size) * 4
        tp = spec.tensor_parallel_size if engine == "vllm" else 1
        rows.append(
            ModelMemory(
                spec.name,
                engine,
                dtype,
                facts,
                length,
                seqs,
                per_param and per_param / tp,
                runtime,
                GiB if engine == "vllm" and not on_gpu else 1,
            )
        )
    usable, where, total = available_memory(on_gpu, gpu_index, gpu_memory_utilization if engine == "vllm" else 0.95)
    if budget is not None and budget < usable:
        usable, where = float(budget), f"memory_budget, {where}"
    return MemoryPlan(rows, usable, where, on_gpu, total)


def available_memory(on_gpu: bool, gpu_index: int = 0, fraction: float = 0.9) -> tuple[float, str, float]:
    """(usable bytes, where, device total): min(free, fraction x total) of a GPU, or 90% of available RAM."""
    if on_gpu:
        import torch

        free, total = torch.cuda.mem_get_info(gpu_index)
        name = torch.cuda.get_device_name(gpu_index)
        usable = float(min(free, fraction * total))
        return usable, f"cuda:{gpu_index} {name}, free {_gib(free)} of {_gib(total)}", float(total)
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:  # psutil is optional: Linux says the same in /proc/meminfo
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(meminfo["MemAvailable"].split()[0]) * 1024
    return 0.9 * available, f"CPU RAM, 90% of {_gib(available)} available", float(available)


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"
