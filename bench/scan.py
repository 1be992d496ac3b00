"""How much the one-pass scan costs next to a plain forward pass over the same tokens.

    .venv/bin/python bench/scan.py [--model MODEL] [--n-samples 32] [--seq-len 256] [--repeats 3]

Prints the scan's wall time divided by a plain forward pass's (the full causal LM, logits
included, as a user would run it; and the decoder stack alone), and the peak memory each
adds on top of the loaded model. Goal: scan / plain forward <= 1.15.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import PeakMemory, median_seconds  # noqa: E402

from hubprune import LayerPruner  # noqa: E402
from hubprune.calibration import calibration_windows  # noqa: E402
from hubprune.config import CalibrationConfig  # noqa: E402
from hubprune.methods.scan import scan_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    pruner = LayerPruner.from_pretrained(args.model, device=args.device)
    model, device = pruner.model, next(pruner.model.parameters()).device
    config = CalibrationConfig(n_samples=args.n_samples, seq_len=args.seq_len, batch_size=args.batch_size)
    windows = calibration_windows(pruner.tokenizer, None, config)
    batches = [windows.ids[i : i + args.batch_size].to(device) for i in range(0, len(windows.ids), args.batch_size)]

    @torch.no_grad()
    def forward(module):
        for batch in batches:
            module(input_ids=batch, use_cache=False)

    def scan():
        scan_model(model, windows, batch_size=args.batch_size, progress=False)

    runs = {"plain forward (causal LM, logits)": lambda: forward(model),
            "plain forward (decoder stack)": lambda: forward(model.base_model),
            "hubprune scan": scan}
    forward(model)  # warm-up
    seconds, memory = {}, {}
    for name, fn in runs.items():
        with PeakMemory(device) as peak:
            fn()
        memory[name] = peak.peak_mib
    for _ in range(args.repeats):  # interleave so that drift hits every run alike
        for name, fn in runs.items():
            seconds.setdefault(name, []).append(median_seconds(fn, 1, device))

    med = {name: sorted(v)[len(v) // 2] for name, v in seconds.items()}
    print(f"model {args.model} ({pruner.num_layers} layers) on {device}, torch threads {torch.get_num_threads()}; "
          f"{windows.num_tokens} calibration tokens ({len(windows.ids)} x {windows.ids.size(1)}), median of {args.repeats}")
    print(f"{'run':36s} {'seconds':>8s} {'tokens/s':>9s} {'peak extra MiB':>15s}")
    for name in runs:
        print(f"{name:36s} {med[name]:8.2f} {windows.num_tokens / med[name]:9.0f} {memory[name]:15.0f}")
    full, stack = med["plain forward (causal LM, logits)"], med["plain forward (decoder stack)"]
    print(f"scan / plain forward (causal LM): {med['hubprune scan'] / full:.3f}   (goal <= 1.15)")
    print(f"scan / plain forward (decoder stack only): {med['hubprune scan'] / stack:.3f}")
    print(f"every block size n = 1..{pruner.num_layers - 1} and every start scored in that one pass")


if __name__ == "__main__":
    main()
