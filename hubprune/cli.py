"""The ``hubprune`` command: thin wrappers over the library's verbs.

hubprune scan MODEL [--out scan.json] [--plot scan.png]
hubprune prune MODEL --drop 6 --out DIR          (or --fraction 0.2, or --layers 12,13,14)
hubprune heal DIR --out HEALED [--steps 200] [--distill 0.5]
hubprune eval DIR [--tasks arc_easy,piqa,hellaswag] [--limit 500 | --sample 2000]
hubprune sweep MODEL --fractions 0.1,0.2,0.3 --out DIR [--heal-steps 50]
hubprune prune MODEL --max-quality-loss 0.05 --out DIR    (as many layers as stay within 5 %)
hubprune cut DIR --layers 40,41,42 --out SMALLER   (file level: no model in memory)
hubprune push DIR user/name [--private] [--create-pr]
hubprune run recipe.yaml
hubprune serve MODEL [MODEL ...] [--config serve.yaml]   (one OpenAI endpoint, several models)
hubprune compare ORIGINAL PRUNED [MORE ...] [--server URL] [--port 7860] [--no-browser]   (side by side, web app)
hubprune space push user/name --models ORIGINAL PRUNED [--private]   (the comparison app as a Space)
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from hubprune._version import __version__
from hubprune.architecture.filesurgery import cut_checkpoint
from hubprune.config import (
    DTYPES,
    HEAL_DIVERGENCES,
    HEAL_METHODS,
    HEAL_PRECISIONS,
    HEAL_TEXTS,
    METRICS,
    SPARSITY_METHODS,
    CalibrationConfig,
    ChatDataConfig,
    HealConfig,
    PruneConfig,
    Recipe,
)
from hubprune.eval.folder import evaluate_folder
from hubprune.heal.folder import heal_folder
from hubprune.hub import push_folder
from hubprune.methods.sweep import QUALITIES, check_sweep, sweep
from hubprune.pruner import LayerPruner, run_recipe

logger = logging.getLogger("hubprune")


# Errors of the user's making: one "hubprune: error:" line and exit status 2, no traceback.
_USER_ERRORS = (
    ValueError,
    TypeError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    ConnectionError,
    ModuleNotFoundError,
)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as typed, for records
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
        code = args.func(args)
    except _USER_ERRORS as err:
        print(f"hubprune: error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("hubprune: interrupted; nothing was written", file=sys.stderr)
        code = 130
    _leave_process_group(wait=code == 0)
    return code


def _leave_process_group(wait: bool) -> None:
    """Under ``accelerate launch`` (or torchrun), leave the process group before exiting. Exiting
    with the group alive, or while another process still uses it, aborts a process whose work
    is done now and then ("terminate called without an active exception", SIGABRT) and the
    launcher reports a failure. ``wait``: the command succeeded, so every process reaches the
    barrier; after a failure it is skipped, as the others may be inside a collective. (An
    uncaught exception ends the process at once, and the launcher stops the others.)"""
    dist = sys.modules.get("torch.distributed")  # never import torch just to find there is nothing to do
    if dist is not None and dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def cmd_scan(args) -> int:
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
        prune=PruneConfig(
            n_layers=args.drop,
            fraction=args.fraction,
            layers=layers,
            metric=args.metric,
            max_quality_loss=args.max_quality_loss,
            quality=args.quality,
            mlp_width=args.mlp_width,
            sparsity=args.sparsity,
            sparsity_method=args.sparsity_method,
        ),
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


def cmd_heal(args) -> int:
    config = HealConfig(
        method=args.method,
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seq_len=args.seq_len,
        learning_rate=args.lr,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        distill=args.distill,
        divergence=args.divergence,
        keep_adapter=args.keep_adapter,
        refit=not args.no_refit,
        data=CalibrationConfig(files=args.data, dataset=args.dataset, corpus=args.corpus),
        text=args.text,
        mix=args.mix,
        on_policy=args.on_policy,
        chat=ChatDataConfig(prompts=args.chat_prompts, conversations=args.conversations),
        precision=args.precision,
    )
    h = heal_folder(
        args.folder,
        args.out,
        config,
        dtype=args.dtype,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    if h is None:  # under accelerate launch, another process wrote the folder
        return 0
    print(
        f"healed {h['steps']} steps ({h['method']}), {h['tokens']} tokens at {h['tokens_per_second']:.0f} tokens/s; "
        f"loss {h['first_loss']:.3f} -> {h['final_loss']:.3f}; saved to {args.out}"
    )
    return 0


def cmd_eval(args) -> int:
    evaluation = evaluate_folder(
        args.model,
        [t for t in args.tasks.split(",") if t],
        limit=args.limit,
        sample=args.sample,
        backend=args.backend,
        data=args.data,
        baseline=not args.no_baseline,
        chat=args.chat,
        continuations=args.continuations,
        chat_prompts=args.chat_prompts,
        max_new_tokens=args.max_new_tokens,
        dtype=args.dtype,
        device=args.device,
        progress=not args.quiet,
    )
    if evaluation is None:  # under accelerate launch, another process reports
        return 0
    print(evaluation.table())
    if args.out:
        Path(args.out).write_text(json.dumps(evaluation.to_dict(), indent=1))
        print(f"results written to {args.out}")
    card = evaluation.record(args.model, command="hubprune " + shlex.join(args.argv))
    if card is False:
        print(f"{args.model}/README.md was edited by hand: the record has the results, the card was left alone")
    elif card:
        print(f"results added to {args.model}/hubprune.json and its model card")
    return 0


def cmd_sweep(args) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; choose another folder or pass --overwrite")
    fractions = [float(f) for f in args.fractions.split(",")]
    metrics = [m for m in args.metrics.split(",") if m]
    check_sweep(fractions, metrics, args.quality)  # before the model is loaded
    heal = HealConfig(steps=args.heal_steps, distill=args.distill) if args.heal_steps else None
    pruner = LayerPruner.from_pretrained(args.model, **_load_options(args))
    pruner.scan(_calibration(args), progress=not args.quiet)
    result = sweep(
        pruner,
        fractions,
        metrics,
        quality=args.quality,
        tasks=args.tasks.split(","),
        limit=args.limit,
        heal=heal,
        progress=not args.quiet,
    )
    files = result.save(out)
    for p in result.points:
        print(
            f"{p.metric:16s} {'healed' if p.healed else 'pruned':7s} drop {p.n_layers:3d} ({p.fraction:.0%}): "
            f"quality {p.quality:.3f}"
        )
    print("written: " + ", ".join(str(f) for f in files.values()))
    return 0


def cmd_cut(args) -> int:
    out = cut_checkpoint(
        args.folder, args.out, _layer_list(args.layers), overwrite=args.overwrite, progress=not args.quiet
    )
    print(f"cut layers {sorted(_layer_list(args.layers))} from {args.folder} at file level; saved to {out}")
    return 0


def cmd_push(args) -> int:
    info = push_folder(
        args.folder,
        args.repo_id,
        private=args.private or None,
        token=args.token,
        create_pr=args.create_pr,
        commit_message=args.message,
        replace_readme=args.replace_readme,
    )
    print(f"pushed {args.folder} to {args.repo_id}: {info.pr_url or info.commit_url}")
    return 0


# serve, compare and space import hubprune.server and hubprune.space when they run: those need the serve and
# space extras (fastapi, gradio), which the other commands do without.
def cmd_serve(args) -> int:
    from hubprune.server.config import from_args
    from hubprune.server.launch import serve

    return serve(from_args(args))


def cmd_compare(args) -> int:
    from hubprune.space.launch import run_compare

    run_compare(
        args.models,
        server_url=args.server,
        host=args.host,
        port=args.port,
        open_browser=not args.no_browser,
        votes_path=args.votes,
        device=args.device,
        use_server=not args.no_server,
        engine=args.engine,
    )
    return 0


def cmd_space(args) -> int:
    from hubprune.space.push import push_space

    info = push_space(
        args.repo_id, args.models, private=args.private or None, token=args.token, commit_message=args.message
    )
    print(f"pushed the comparison Space {args.repo_id}: {info.commit_url}")
    return 0


def _run(recipe: Recipe, quiet: bool) -> int:
    pruned, out = run_recipe(recipe, progress=not quiet)
    r = pruned.record
    if pruned.scan is not None and not quiet and r.removed_layers:
        print(pruned.scan.table(block_sizes=[len(r.removed_layers)]))
    print(f"{r.base_model}: {r.summary()}")
    if out is not None:
        print(f"saved to {out}")
    return 0


def _calibration(args) -> CalibrationConfig:
    return CalibrationConfig(
        files=args.calibration,
        dataset=args.dataset,
        corpus=args.corpus,
        n_samples=args.n_samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
    )


def _load_options(args) -> dict:
    return {
        "revision": args.revision,
        "dtype": args.dtype,
        "device": args.device,
        "trust_remote_code": args.trust_remote_code,
        "streaming": {"auto": "auto", "on": True, "off": False}[args.streaming],
    }


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
    model.add_argument("--dtype", default="float32", choices=DTYPES)
    model.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    model.add_argument(
        "--trust-remote-code", action="store_true", help="run the model repo's own code (off by default)"
    )
    model.add_argument(
        "--streaming",
        choices=["auto", "on", "off"],
        default="auto",
        help="scan layer by layer from the shards and cut files (default: only if the model does not fit)",
    )
    calib = model.add_argument_group("calibration")
    calib.add_argument("--calibration", nargs="+", metavar="FILE", help="text files (default: the offline corpus)")
    calib.add_argument("--dataset", help="a datasets name or save_to_disk folder with a 'text' column")
    calib.add_argument(
        "--corpus", default=CalibrationConfig.corpus, help="offline default corpus: wiki, c4, tiny, code, technical"
    )
    calib.add_argument(
        "--n-samples", type=int, default=CalibrationConfig.n_samples, help="calibration windows (default %(default)s)"
    )
    calib.add_argument(
        "--seq-len", type=int, default=CalibrationConfig.seq_len, help="tokens per window (default %(default)s)"
    )
    calib.add_argument("--batch-size", type=int, default=CalibrationConfig.batch_size)

    scan = sub.add_parser("scan", parents=[common, model], help="score every block of layers")
    scan.add_argument("--out", help="write the scan as JSON")
    scan.add_argument("--plot", help="write a PNG heat map")
    scan.add_argument("--metric", default="angular_last", choices=METRICS, help="metric of the heat map")
    scan.add_argument(
        "--loss-block-sizes",
        type=int,
        nargs="+",
        metavar="N",
        help="also measure calibration perplexity with each block of N layers removed",
    )
    scan.set_defaults(func=cmd_scan)

    prune = sub.add_parser("prune", parents=[common, model], help="drop layers and save a transformers checkpoint")
    how = prune.add_mutually_exclusive_group()
    how.add_argument("--drop", type=int, metavar="N", help="number of layers to drop")
    how.add_argument("--fraction", type=float, help="fraction of layers to drop, in (0, 1)")
    how.add_argument("--layers", help="explicit 0-based layers to drop, e.g. 12,13,14")
    how.add_argument(
        "--max-quality-loss",
        type=float,
        metavar="X",
        help="drop as many layers as keep quality within X (e.g. 0.05) of the original, by measuring",
    )
    prune.add_argument(
        "--quality",
        default="perplexity",
        choices=QUALITIES,
        help="what --max-quality-loss measures: held-out perplexity, zero-shot tasks, or chat "
        "answers (top-1 agreement with the original's)",
    )
    prune.add_argument("--metric", default="angular_last", choices=METRICS)
    prune.add_argument(
        "--mlp-width",
        type=float,
        metavar="W",
        help="also keep this share of every MLP's neurons, in (0, 1), e.g. 0.8 (ranked on the calibration text)",
    )
    prune.add_argument(
        "--sparsity",
        metavar="S",
        help="also zero weights of the decoder projections: a fraction such as 0.5, or N:M such as 2:4",
    )
    prune.add_argument("--sparsity-method", default="wanda", choices=SPARSITY_METHODS)
    prune.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    prune.set_defaults(func=cmd_prune)

    heal = sub.add_parser("heal", parents=[common], help="heal a pruned folder with LoRA (and distillation)")
    heal.add_argument("folder", help="a folder written by hubprune prune")
    heal.add_argument("--out", required=True, help="output folder for the healed model")
    heal.add_argument(
        "--method",
        default="lora",
        choices=HEAL_METHODS,
        help="qlora: load the folder in 4-bit NF4 (never in full precision), merge at file level",
    )
    heal.add_argument("--steps", type=int, default=HealConfig.steps)
    heal.add_argument("--batch-size", type=int, default=HealConfig.batch_size)
    heal.add_argument("--grad-accum", type=int, default=HealConfig.grad_accum)
    heal.add_argument("--seq-len", type=int, default=HealConfig.seq_len)
    heal.add_argument("--lr", type=float, default=HealConfig.learning_rate)
    heal.add_argument("--lora-r", type=int, default=HealConfig.lora_r)
    heal.add_argument("--lora-alpha", type=int, default=HealConfig.lora_alpha, help="LoRA scale numerator (alpha / r)")
    heal.add_argument(
        "--distill", type=float, default=HealConfig.distill, help="weight of the KL to the original, in [0, 1]"
    )
    heal.add_argument(
        "--no-refit",
        action="store_true",
        help="skip the closed-form refit of the layer before each gap (done before LoRA by default)",
    )
    heal.add_argument("--keep-adapter", action="store_true", help="also save the LoRA adapter in OUT/adapter")
    heal.add_argument(
        "--precision",
        default=HealConfig.precision,
        choices=HEAL_PRECISIONS,
        help="arithmetic of the training passes: bfloat16 autocast (auto: where the GPU or CPU computes "
        "it natively) or float32",
    )
    heal.add_argument(
        "--text",
        default=HealConfig.text,
        choices=HEAL_TEXTS,
        help="chat: conversations the original writes itself (the default for models with a chat "
        "template); prose: --data, --dataset or --corpus text",
    )
    heal.add_argument(
        "--mix", type=float, default=HealConfig.mix, help="share of prose windows mixed into chat healing"
    )
    heal.add_argument(
        "--divergence",
        default=HealConfig.divergence,
        choices=HEAL_DIVERGENCES,
        help="distillation term: forward KL(original || pruned), reverse KL(pruned || original) or jsd",
    )
    heal.add_argument(
        "--on-policy",
        type=float,
        default=HealConfig.on_policy,
        help="share of chat healing steps on answers the pruned model writes itself at that step (GKD)",
    )
    heal.add_argument(
        "--conversations",
        type=int,
        default=ChatDataConfig.conversations,
        help="conversations the original writes for chat healing (cached; a rerun reuses them)",
    )
    heal.add_argument(
        "--chat-prompts",
        default="magpie",
        metavar="FILE",
        help="a file of user prompts, one a line, for chat healing (default: the original writes them)",
    )
    heal.add_argument(
        "--data", nargs="+", metavar="FILE", help="healing text files (default: the corpus's train split)"
    )
    heal.add_argument("--dataset", help="a datasets name or save_to_disk folder with a 'text' column")
    heal.add_argument("--corpus", default="wiki")
    heal.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="lora only (qlora computes in bfloat16; merged weights keep their stored dtype)",
    )
    heal.add_argument("--device", default="auto")
    heal.set_defaults(func=cmd_heal)

    ev = sub.add_parser("eval", parents=[common], help="held-out perplexity and zero-shot accuracy (harness-style)")
    ev.add_argument("model", help="a model (Hub id, folder, .gguf); a hubprune folder is compared with its original")
    ev.add_argument(
        "--tasks",
        default="arc_easy,piqa,hellaswag",
        help="comma-separated: arc_easy, arc_challenge, piqa, hellaswag, winogrande, boolq, mmlu; "
        "with --backend lm-eval, any harness task, group or tag",
    )
    ev.add_argument(
        "--backend",
        default="hubprune",
        choices=["hubprune", "lm-eval"],
        help="hubprune: the built-in tasks, scored as the harness scores them; lm-eval: any "
        "lm-evaluation-harness task, scored by the harness itself (pip install 'hubprune[harness]')",
    )
    ev.add_argument(
        "--data",
        nargs="+",
        metavar="TASK=PATH",
        help="lm-eval only: a local copy of a harness task's data (the rows of the split it scores, in its "
        "Hub dataset's schema: .jsonl/.json/.csv/.parquet or a save_to_disk folder), for use offline",
    )
    ev.add_argument("--limit", type=int, help="first N questions of each task (default: all)")
    ev.add_argument("--sample", type=int, help="N evenly spaced questions of each task instead of the first N")
    ev.add_argument("--no-baseline", action="store_true", help="do not evaluate the original of a pruned folder")
    ev.add_argument(
        "--chat",
        action="store_true",
        help="also score the answers: the original answers held-out prompts greedily through its chat "
        "template; top-1 agreement, KL, and the share of looping and unfinished answers",
    )
    ev.add_argument(
        "--continuations",
        action="store_true",
        help="as --chat, on plain continuations of held-out prose (for models without a chat template)",
    )
    ev.add_argument("--chat-prompts", type=int, default=128, metavar="N", help="held-out prompts for --chat (128)")
    ev.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit for --chat (128)")
    ev.add_argument("--out", help="write the results as JSON")
    ev.add_argument("--dtype", default="float32", choices=DTYPES)
    ev.add_argument("--device", default="auto")
    ev.set_defaults(func=cmd_eval)

    sw = sub.add_parser("sweep", parents=[common, model], help="quality against the fraction of layers dropped")
    sw.add_argument("--fractions", default="0.1,0.2,0.3,0.4,0.5")
    sw.add_argument("--metrics", default="angular_last,block_influence")
    sw.add_argument("--quality", default="perplexity", choices=QUALITIES)
    sw.add_argument("--tasks", default="arc_easy,piqa,hellaswag")
    sw.add_argument("--limit", type=int, default=200, help="questions per task when --quality tasks")
    sw.add_argument("--heal-steps", type=int, default=0, help="also heal each point for this many steps")
    sw.add_argument("--distill", type=float, default=1.0, help="KL weight when healing")
    sw.add_argument("--out", required=True, help="folder for sweep.json, sweep.csv and sweep.png")
    sw.set_defaults(func=cmd_sweep)

    cut = sub.add_parser(
        "cut", parents=[common], help="drop layers from a safetensors folder without loading the model"
    )
    cut.add_argument("folder", help="a local transformers folder with safetensors weights")
    cut.add_argument("--layers", required=True, help="0-based layers to drop, e.g. 40,41,42")
    cut.add_argument("--out", required=True, help="output folder")
    cut.set_defaults(func=cmd_cut)

    push = sub.add_parser("push", parents=[common], help="publish a pruned folder to the Hub in one commit")
    push.add_argument("folder", help="a folder written by hubprune prune or heal")
    push.add_argument("repo_id", help="user/name or org/name")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--token", help="a Hub write token (default: HF_TOKEN or the saved login); never printed")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    push.add_argument("--message", help="commit message")
    push.add_argument("--replace-readme", action="store_true", help="replace a README.md you edited with a fresh card")
    push.set_defaults(func=cmd_push)

    run = sub.add_parser("run", parents=[common], help="carry out a recipe YAML")
    run.add_argument("recipe", help="recipe YAML file")
    run.add_argument("--out", help="override the recipe's output folder")
    run.set_defaults(func=cmd_run)

    cmp = sub.add_parser("compare", parents=[common], help="one prompt to two or more models, streamed side by side")
    cmp.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="ORIGINAL PRUNED [MORE ...]: Hub ids, folders, .gguf files, or NAME=PATH",
    )
    cmp.add_argument(
        "--server",
        help="an OpenAI-compatible server URL to stream from (default: $HUBPRUNE_SERVER_URL; "
        "else hubprune serve is started on a free local port)",
    )
    cmp.add_argument("--no-server", action="store_true", help="load the models in this process instead")
    cmp.add_argument(
        "--engine",
        choices=["auto", "transformers", "vllm"],
        help="engine of the hubprune serve it starts (default: serve's own choice)",
    )
    cmp.add_argument("--host", default="127.0.0.1", help="address of the web app (default: this machine only)")
    cmp.add_argument("--port", type=int, default=7860, help="port of the web app (default 7860)")
    cmp.add_argument("--no-browser", action="store_true", help="do not open a browser; only print the URL")
    cmp.add_argument(
        "--votes", help="JSONL file for A/B votes (default: $HUBPRUNE_VOTES, else votes.jsonl in ~/.cache/hubprune)"
    )
    cmp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    cmp.set_defaults(func=cmd_compare)

    space = sub.add_parser("space", help="the comparison app as a Hugging Face Space")
    space_push = space.add_subparsers(dest="space_command", required=True).add_parser(
        "push", parents=[common], help="create or update a Gradio Space comparing models, in one commit"
    )
    space_push.add_argument("repo_id", help="user/name or org/name of the Space")
    space_push.add_argument(
        "--models",
        nargs="+",
        required=True,
        metavar="HUB_ID",
        help="two or more Hub ids (space- or comma-separated): the original and its pruned copies",
    )
    space_push.add_argument("--private", action="store_true", help="create the Space as private")
    space_push.add_argument("--token", help="a Hub write token (default: HF_TOKEN or the saved login); never printed")
    space_push.add_argument("--message", help="commit message")
    space_push.set_defaults(func=cmd_space)

    from hubprune.server.config import add_arguments

    serve = sub.add_parser("serve", parents=[common], help="serve models side by side behind one OpenAI endpoint")
    add_arguments(serve)
    serve.set_defaults(func=cmd_serve)
    return parser


if __name__ == "__main__":
    sys.exit(main())
