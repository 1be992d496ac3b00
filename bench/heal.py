"""Healing speed against a plain peft LoRA training loop on the same model and batches.

    .venv/bin/python bench/heal.py [--model MODEL] [--steps 8] [--drop 6] [--distill 0.5] [--precision bfloat16]

Both sides train the same LoRA (r=8 on the family's projections) of the same pruned
model on the same prose windows, batch 4 x 256, AdamW, in the same arithmetic (--precision:
float32, or both under bfloat16 autocast); the plain side is the loop a peft user
writes by hand (``model(input_ids, labels=input_ids).loss.backward()``). Prints tokens/s
of each (medians of interleaved runs), their ratio (goal >= 0.95), and the peak memory each adds. With --distill the
hubprune side also runs the teacher (reported as a separate line, not in the ratio).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import PeakMemory  # noqa: E402

from hubprune import LayerPruner  # noqa: E402
from hubprune.architecture.families import family_of  # noqa: E402
from hubprune.architecture.surgery import copy_sharing_weights  # noqa: E402
from hubprune.config import HealConfig  # noqa: E402
from hubprune.heal.data import healing_windows, micro_batch  # noqa: E402
from hubprune.heal.lora import heal_model  # noqa: E402


def plain_peft(model, windows, config: HealConfig) -> float:
    """tokens/s of the hand-written peft loop over the same batches (timed like heal_model: every step)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=list(family_of(model).lora_targets),
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=config.learning_rate)
    device = next(model.parameters()).device
    bf16 = config.precision == "bfloat16"
    started, tokens = time.perf_counter(), 0
    for step in range(config.steps):
        batch = micro_batch(windows, step, config, 0, 1)[0].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tokens += batch.numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - started)


def hubprune_heal(pruned, config: HealConfig, teacher=None) -> float:
    student = copy_sharing_weights(pruned.model)  # as PrunedModel.heal does
    _, report = heal_model(student, pruned.tokenizer, config, teacher=teacher, progress=False)
    return report.tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--drop", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--distill", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs of each side")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"], help="both sides")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    pruner = LayerPruner.from_pretrained(args.model, device=args.device)
    pruner.scan(n_samples=8, progress=False)
    pruned = pruner.prune(n_layers=args.drop)
    device = next(pruned.model.parameters()).device
    same = dict(warmup_steps=0, text="prose", refit=False, precision=args.precision)  # no teacher: prose, no refit
    config = HealConfig(steps=args.steps, **same)
    windows = healing_windows(pruned.tokenizer, config, None, 1, teacher=None, progress=False)  # prose, as heal_model's

    warm = HealConfig(steps=1, **same)  # first-call allocations and lazy imports, on both sides
    hubprune_heal(pruned, warm)
    plain_peft(copy_sharing_weights(pruned.model), windows, warm)
    sides = {"hubprune heal (LoRA)": lambda: hubprune_heal(pruned, config),
             "plain peft LoRA loop": lambda: plain_peft(copy_sharing_weights(pruned.model), windows, config)}
    runs = {name: [] for name in sides}
    for repeat in range(args.repeats):  # interleaved, the order alternating, so both sides see the same machine
        for name in (list(sides) if repeat % 2 == 0 else list(sides)[::-1]):
            with PeakMemory(device) as peak:
                speed = sides[name]()
            runs[name].append((speed, peak.peak_mib))
    rows = {name: (statistics.median(r[0] for r in rs), max(r[1] for r in rs)) for name, rs in runs.items()}
    if args.distill:
        with PeakMemory(device) as peak:
            speed = hubprune_heal(pruned, HealConfig(steps=args.steps, distill=args.distill, **same), pruner.model)
        rows[f"hubprune heal (LoRA + distill {args.distill})"] = (speed, peak.peak_mib)

    print(f"model {args.model}, {pruner.num_layers} -> {pruner.num_layers - args.drop} layers, on {device}, "
          f"torch threads {torch.get_num_threads()}, {args.precision}; batch {config.batch_size} x {config.seq_len}, {args.steps} steps each")
    print(f"{'run':36s} {'tokens/s (median)':>17s} {'each run':>22s} {'peak extra MiB':>15s}")
    for name, (speed, mib) in rows.items():
        each = ", ".join(f"{r[0]:.0f}" for r in runs.get(name, []))
        print(f"{name:36s} {speed:17.0f} {each:>22s} {mib:15.0f}")
    ratio = rows["hubprune heal (LoRA)"][0] / rows["plain peft LoRA loop"][0]
    print(f"hubprune / plain peft tokens/s: {ratio:.3f}   (goal >= 0.95; medians of {args.repeats} interleaved runs "
          "each, after one warm-up step on both sides)")


if __name__ == "__main__":
    main()
