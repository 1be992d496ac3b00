"""Big models on small machines: streamed scan memory and file-level surgery time.

    .venv/bin/python bench/scale.py [--workdir /tmp/hubprune-scale] [--layers 22] [--drop 6]

Builds a synthetic checkpoint of a real Llama-style config (TinyLlama-1.1B shapes, random
bf16 weights, several shards, about 2.3 GB), then prints:
- peak memory (VmHWM of a fresh process) of a full-load scan against the streamed scan,
  both computing in float32 on the same calibration tokens (goal: streamed <= 1/4);
- the file-level surgery time against a plain copy of the same kept bytes (goal: <= 1.2x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

CHILD = r"""
import json, resource, sys, time, torch
from hubprune.calibration import TokenWindows
mode, folder = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
windows = TokenWindows(torch.randint(10, 30000, (8, 128)), ["synthetic"], "random tokens")
started = time.perf_counter()
if mode == "full":
    from transformers import AutoModelForCausalLM
    from hubprune.methods.scan import scan_model
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    result = scan_model(model, windows, batch_size=8, progress=False)
else:
    from hubprune.methods.streamscan import streamed_scan
    result = streamed_scan(folder, windows, dtype=torch.float32, progress=False)
def peak_mib():
    # VmHWM is this program's own peak (reset by exec); ru_maxrss also keeps the forking parent's RSS at fork time.
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": time.perf_counter() - started, "peak_mib": peak_mib(),
                  "choose": result.choose(6)}))
"""


def build_checkpoint(folder: Path, num_layers: int) -> None:
    """Random bf16 weights for TinyLlama-1.1B's config, written shard by shard (never the whole model at once)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                         num_hidden_layers=num_layers, vocab_size=32000, max_position_embeddings=2048,
                         tie_word_embeddings=False, dtype="bfloat16")
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    h, i, kv = 2048, 5632, 4 * 64
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    shards = [{"model.embed_tokens.weight": rand(32000, h)}]
    for layer in range(num_layers):
        p = f"model.layers.{layer}."
        tensors = {p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                   p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                   p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
                   p + "mlp.down_proj.weight": rand(h, i),
                   p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                   p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        if layer % 4 == 0:
            shards.append({})
        shards[-1].update(tensors)
    shards.append({"model.norm.weight": torch.ones(h, dtype=torch.bfloat16), "lm_head.weight": rand(32000, h)})
    weight_map, total = {}, 0
    for n, shard in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))


def run_child(mode: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(folder)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def plain_copy(folder: Path, target: Path, removed: set[int]) -> None:
    """Copy the bytes of every kept tensor into one file (kernel copy where possible): the floor."""
    from hubprune.architecture.filesurgery import copy_range, read_header, shard_files

    with target.open("wb") as out:
        for shard in shard_files(folder):
            header, start = read_header(folder / shard)
            with (folder / shard).open("rb") as f:
                for name, info in header.items():
                    if name == "__metadata__" or any(f".layers.{r}." in name for r in removed):
                        continue
                    begin, end = info["data_offsets"]
                    copy_range(f, out, start + begin, end - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/hubprune-scale")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--drop", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from hubprune.architecture.filesurgery import cut_checkpoint
    from hubprune.methods.streamscan import checkpoint_bytes

    work = Path(args.workdir)
    source = work / "synthetic-llama"
    if not (source / "config.json").is_file():
        print(f"building a synthetic {args.layers}-layer checkpoint in {source} ...", flush=True)
        build_checkpoint(source, args.layers)
    size = checkpoint_bytes(source)
    print(f"checkpoint: {size / 1e9:.2f} GB in {len(list(source.glob('*.safetensors')))} shards, "
          f"{args.layers} layers (TinyLlama-1.1B shapes, bf16, random)")

    full, streamed = run_child("full", source), run_child("stream", source)
    print(f"{'scan':24s} {'peak RSS MiB':>13s} {'seconds':>8s}")
    print(f"{'full load (float32)':24s} {full['peak_mib']:13.0f} {full['seconds']:8.1f}")
    print(f"{'streamed (float32)':24s} {streamed['peak_mib']:13.0f} {streamed['seconds']:8.1f}")
    print(f"streamed / full peak memory: {streamed['peak_mib'] / full['peak_mib']:.3f}   (goal <= 0.25); "
          f"same choice of 6 layers: {full['choose'] == streamed['choose']}")

    removed = list(range(args.layers - args.drop - 2, args.layers - 2))
    cut_times, copy_times = [], []
    for _ in range(args.repeats):  # interleaved; dirty pages flushed and old outputs deleted outside the timings
        target = work / "copy.bin"
        os.sync()
        started = time.perf_counter()
        plain_copy(source, target, set(removed))
        copy_times.append(time.perf_counter() - started)
        os.remove(target)
        shutil.rmtree(work / "cut", ignore_errors=True)
        os.sync()
        started = time.perf_counter()
        cut_checkpoint(source, work / "cut", removed, progress=False)
        cut_times.append(time.perf_counter() - started)
    kept = checkpoint_bytes(work / "cut")
    cut, copy = statistics.median(cut_times), statistics.median(copy_times)
    print(f"file-level surgery of {args.drop} layers: {kept / 1e9:.2f} GB kept; cut {cut:.2f} s, "
          f"plain copy of the kept bytes {copy:.2f} s (median of {args.repeats})")
    print(f"cut / plain copy: {cut / copy:.3f}   (goal <= 1.2)")
    shutil.rmtree(work / "cut", ignore_errors=True)


if __name__ == "__main__":
    main()
