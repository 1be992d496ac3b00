"""The ``hubprune`` command: thin wrappers over the library's verbs.

    hubprune scan MODEL [--out scan.json] [--plot scan.png]
    hubprune prune MODEL --drop 6 --out DIR          (or --fraction 0.2, or --layers 12,13,14)
    hubprune run recipe.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hubprune import __version__
from hubprune.config import METRICS, CalibrationConfig, PruneConfig, Recipe

logger = logging.getLogger("hubprune")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not args.verbose:
        import transformers

        transformers.logging.set_verbosity_error()
    if getattr(args, "quiet", False):
        import huggingface_hub
        import transformers

        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as err:
        print(f"hubprune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hubprune: interrupted; nothing was written", file=sys.stderr)
        return 130


def cmd_scan(args) -> int:
    from hubprune.pruner import LayerPruner

    for path in (args.out, args.plot):
        if path and Path(path).exists() and not args.overwrite:
            raise FileExistsError(f"{path} already exists; choose another path or pass --overwrite")
    pruner = LayerPruner.from_pretrained(args.model, **_load_options(args))
    result = pruner.scan(_calibration(args), loss_block_sizes=args.loss_block_sizes or [], progress=not args.quiet)
    print(result)
    if args.out:
        result.save(args.out)
        print(f"scan written to {args.out}")
    if args.plot:
        result.plot(args.plot, metric=args.metric)
        print(f"heat map written to {args.plot}")
    return 0


def cmd_prune(args) -> int:
    layers = _layer_list(args.layers) if args.layers else None
    recipe = Recipe(
        model=args.model,
        prune=PruneConfig(n_layers=args.drop, fraction=args.fraction, layers=layers, metric=args.metric),
        calibration=_calibration(args),
        output=args.out,
        overwrite=args.overwrite,
        **_load_options(args),
    )
    return _run(recipe, quiet=args.quiet)


def cmd_run(args) -> int:
    recipe = Recipe.load(args.recipe)
    if args.out:
        recipe.output = args.out
    if args.overwrite:
        recipe.overwrite = True
    return _run(recipe, quiet=args.quiet)


def _run(recipe: Recipe, quiet: bool) -> int:
    from hubprune.pruner import run_recipe

    pruned, out = run_recipe(recipe, progress=not quiet)
    r = pruned.record
    if pruned.scan is not None and not quiet:
        print(pruned.scan.table(block_sizes=[len(r.removed_layers)]))
    print(f"{r.base_model}: removed layers {r.removed_layers} ({r.metric}); "
          f"{r.base_num_layers} -> {r.num_layers} layers, "
          f"{r.parameters_before / 1e6:.1f}M -> {r.parameters_after / 1e6:.1f}M parameters")
    if out is not None:
        print(f"saved to {out}")
    return 0


def _calibration(args) -> CalibrationConfig:
    return CalibrationConfig(
        files=args.calibration, dataset=args.dataset, corpus=args.corpus,
        n_samples=args.n_samples, seq_len=args.seq_len, batch_size=args.batch_size,
    )


def _load_options(args) -> dict:
    return {"revision": args.revision, "dtype": args.dtype, "device": args.device, "trust_remote_code": args.trust_remote_code}


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"--layers takes comma-separated 0-based integers such as 12,13,14, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hubprune", description="Drop the layers a causal LM does not need.")
    parser.add_argument("--version", action="version", version=f"hubprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or tables")
    common.add_argument("--overwrite", action="store_true", help="replace an existing output")

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("model", help="Hub id, local transformers folder, or .gguf file")
    model.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    model.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    model.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    model.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own code (off by default)")
    calib = model.add_argument_group("calibration")
    calib.add_argument("--calibration", nargs="+", metavar="FILE", help="text files (default: the offline corpus)")
    calib.add_argument("--dataset", help="a datasets name or save_to_disk folder with a 'text' column")
    calib.add_argument("--corpus", default="wiki", help="offline default corpus: wiki, c4, tiny, code, technical")
    calib.add_argument("--n-samples", type=int, default=32, help="calibration windows (default 32)")
    calib.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    calib.add_argument("--batch-size", type=int, default=4)

    scan = sub.add_parser("scan", parents=[common, model], help="score every block of layers")
    scan.add_argument("--out", help="write the scan as JSON")
    scan.add_argument("--plot", help="write a PNG heat map")
    scan.add_argument("--metric", default="angular_last", choices=METRICS, help="metric of the heat map")
    scan.add_argument("--loss-block-sizes", type=int, nargs="+", metavar="N",
                      help="also measure calibration perplexity with each block of N layers removed")
    scan.set_defaults(func=cmd_scan)

    prune = sub.add_parser("prune", parents=[common, model], help="drop layers and save a transformers checkpoint")
    how = prune.add_mutually_exclusive_group(required=True)
    how.add_argument("--drop", type=int, metavar="N", help="number of layers to drop")
    how.add_argument("--fraction", type=float, help="fraction of layers to drop, in (0, 1)")
    how.add_argument("--layers", help="explicit 0-based layers to drop, e.g. 12,13,14")
    prune.add_argument("--metric", default="angular_last", choices=METRICS)
    prune.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    prune.set_defaults(func=cmd_prune)

    run = sub.add_parser("run", parents=[common], help="carry out a recipe YAML")
    run.add_argument("recipe", help="recipe YAML file")
    run.add_argument("--out", help="override the recipe's output folder")
    run.set_defaults(func=cmd_run)
    return parser


if __name__ == "__main__":
    sys.exit(main())
