"""The model card of a pruned folder, rendered from ``cards/`` with huggingface_hub's ModelCard.

Everything in the card is read from the folder (``hubprune.json``, the recipe, the scan
plot, the weights), so the card cannot drift from the model it describes. Sections whose
information does not exist (no evaluation, no healing, no speed figures) are left out.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from pathlib import Path

from hubprune.cards import template_path
from hubprune.record import PLOT_FILE, RECIPE_FILE, PruneRecord

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
BASE_TAGS = ["hubprune", "pruned"]
# The offline default corpora, as the Hub datasets their text comes from.
CORPUS_DATASETS = {"wiki": "wikimedia/wikipedia", "c4": "allenai/c4", "tiny": "roneneldan/TinyStories"}
HUB_LICENSES = frozenset(
    """
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5
cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0
cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0
cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl
lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl
openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license
fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2 llama3.3 llama4 gemma unknown other
""".split()
)
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def render_card(folder: str | Path, repo_id: str | None = None):
    """The ``huggingface_hub.ModelCard`` of a folder written by hubprune.

    Example: ``render_card("out/smollm2-24l", "me/smollm2-24l").save("out/smollm2-24l/README.md")``
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    record = PruneRecord.load(folder)
    config = json.loads((folder / "config.json").read_text())
    repo_id = repo_id or folder.name
    tags = [*BASE_TAGS, *_method_tags(record), *(record.origin.get("card", {}).get("tags") or [])]
    data = ModelCardData(
        base_model=record.base_model if record.origin.get("kind") != "local" else None,
        library_name="transformers",
        pipeline_tag=record.origin.get("card", {}).get("pipeline_tag", "text-generation"),
        tags=list(dict.fromkeys(tags)),
        datasets=_datasets(record) or None,
        language=record.origin.get("card", {}).get("language"),
        model_name=repo_id if record.evaluation else None,
        eval_results=_eval_results(record) or None,
        **_license(record.origin.get("card", {})),
    )
    recipe = folder / RECIPE_FILE
    card = ModelCard.from_template(
        data,
        template_path=str(template_path()),
        title=repo_id.rsplit("/", 1)[-1],
        repo_id=repo_id,
        short_name=repo_id.rsplit("/", 1)[-1],
        summary=_summary(record, config),
        base_model=base_name(record),
        base_num_layers=record.base_num_layers,
        layer_map=layer_map(record.removed_layers, record.base_num_layers),
        removed_layers=record.removed_layers,
        metric_text=_metric_text(record),
        reshape_rows=_reshape_rows(record),
        reshape_note=_reshape_note(record),
        sparse_pattern=record.sparsity.get("pattern"),
        scan_plot=PLOT_FILE if (folder / PLOT_FILE).is_file() else None,
        eval_rows=_eval_rows(record),
        eval_note=_eval_note(record),
        size_rows=_size_rows(record, config, folder),
        speed_rows=_speed_rows(record),
        speed_device=record.evaluation.get("speed", {}).get("device"),
        healing_rows=_healing_rows(record),
        recipe_yaml=_shown_recipe(recipe) if recipe.is_file() else None,
        hubprune_version=record.hubprune_version,
        origin_note=record.origin.get("note"),
        hubprune_serve=importlib.util.find_spec("hubprune.server") is not None,
    )
    return card


def _shown_recipe(path: Path) -> str:
    """The recipe as the card shows it: each absolute path (a local model, the output folder, text
    files) is shortened to its last part, so the card never prints this machine's folders."""
    return re.sub(
        r"^(\s*(?:[\w-]+: |- ))(/[^\n]*)$", lambda m: m.group(1) + Path(m.group(2)).name, path.read_text(), flags=re.M
    )


def base_name(record: PruneRecord) -> str:
    """How the card names the original: its Hub id, or a local folder's or file's name (never this machine's path)."""
    name = record.base_model
    return Path(name).name if Path(name).is_absolute() or record.origin.get("kind") == "local" else name


def write_card(folder: str | Path, repo_id: str | None = None) -> Path:
    """Render the card into ``folder/README.md`` and remember its hash (to tell user edits apart)."""
    folder = Path(folder)
    text = str(render_card(folder, repo_id))
    (folder / CARD_FILE).write_text(text)
    record = PruneRecord.load(folder)
    record.card_sha256 = _sha256(text)
    record.save(folder)
    return folder / CARD_FILE


def readme_was_edited(folder: str | Path) -> bool:
    """Whether ``folder/README.md`` differs from the card hubprune wrote there (a user edited it)."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return False
    return _sha256(path.read_text()) != PruneRecord.load(folder).card_sha256


def layer_map(removed: list[int], num_layers: int) -> str:
    """A ruler of the original's layers, ``x`` for removed and ``.`` for kept (0-based)."""
    marks = "".join("x" if i in set(removed) else "." for i in range(num_layers))
    ruler = "".join(str(i // 10) if i % 10 == 0 else " " for i in range(num_layers))
    units = "".join(str(i % 10) for i in range(num_layers))
    return f"tens   {ruler}\nunits  {units}\nlayer  {marks}"


def _method_tags(record: PruneRecord) -> list[str]:
    tags = ["depth-pruning"] if record.removed_layers else []
    if record.width:
        tags.append("width-pruning")
    if record.sparsity:
        tags += [
            "sparse",
            f"{record.sparsity['pattern']}-sparsity"
            if record.sparsity["pattern"] != "unstructured"
            else "unstructured-sparsity",
        ]
    return tags


def _summary(record: PruneRecord, config: dict) -> str:
    n, L = len(record.removed_layers), record.base_num_layers
    saved = 1 - record.parameters_after / record.parameters_before
    done = [f"{n} of its {L} decoder layers removed ({n / L:.0%} of the depth)"] if n else []
    if record.width:
        w = record.width
        done.append(
            f"every MLP narrowed from {w['intermediate_size_before']:,} to {w['intermediate_size_after']:,} neurons"
        )
    if record.sparsity:
        sp = record.sparsity
        pattern = f"in a {sp['pattern']} pattern" if sp["pattern"] != "unstructured" else "unstructured"
        done.append(f"{sp['sparsity']:.0%} of its decoder projection weights set to zero ({pattern}, {sp['method']})")
    what = ", ".join(done[:-1]) + (" and " if len(done) > 1 else "") + done[-1]
    text = (
        f"This is {base_name(record)} with {what}, leaving {L - n} layers and "
        f"{_millions(record.parameters_after)} parameters "
        f"({saved:.1%} fewer than the original's {_millions(record.parameters_before)})."
    )
    if record.healing:
        h = record.healing
        text += f" It was then healed with {_method_text(h)} for {h['steps']} steps ({h['tokens']:,} tokens)."
    kept = _headline_quality(record)
    if kept:
        text += f" {kept}"
    return text


def _headline_quality(record: PruneRecord) -> str | None:
    rows = _task_pairs(record)
    if rows:
        retained = [(p - c) / (o - c) for _, o, p, c in rows if o > c]
        if retained:
            names = ", ".join(name for name, *_ in rows)
            return (
                f"On {names} it keeps {sum(retained) / len(retained):.0%} of the original's accuracy above chance "
                "(acc_norm, zero-shot)."
            )
    ppl = _perplexities(record)
    if ppl:
        return f"Held-out perplexity goes from {ppl[0]:.2f} to {ppl[1]:.2f}."
    return None


def _reshape_rows(record: PruneRecord) -> list[dict]:
    """The width and sparsity table: MLP intermediate size, then the zeros of each projection kind."""
    rows = []
    if record.width:
        w = record.width
        rows.append(
            {
                "name": "MLP intermediate size (every layer)",
                "original": f"{w['intermediate_size_before']:,}",
                "pruned": f"{w['intermediate_size_after']:,}",
                "change": f"{w['intermediate_size_after'] / w['intermediate_size_before'] - 1:+.1%}",
            }
        )
    sp = record.sparsity
    for kind, entry in sp.get("projections", {}).items():
        rows.append(
            {
                "name": f"{kind} weights that are zero ({entry['modules']} matrices)",
                "original": "0",
                "pruned": f"{entry['zeros']:,} of {entry['weights']:,}",
                "change": f"{entry['sparsity']:.1%} sparse",
            }
        )
    return rows


def _reshape_note(record: PruneRecord) -> str:
    parts = []
    if record.width:
        w = record.width
        parts.append(
            f"Neurons were ranked by {w['importance']} ({w['tokens']:,} tokens) and the same number kept "
            "in every layer, so `intermediate_size` in config.json is one smaller integer."
        )
    sp = record.sparsity
    if sp:
        score = (
            "Wanda (|W| times the input's L2 norm on the calibration text, per output row)"
            if sp["method"] == "wanda"
            else "magnitude (|W|, per matrix)"
        )
        pattern = (
            f"in every group of {sp['pattern'].split(':')[1]} consecutive inputs of a row, "
            f"{sp['pattern'].split(':')[0]} weights are kept"
            if sp["pattern"] != "unstructured"
            else "unstructured"
        )
        parts.append(
            f"Weights were zeroed by {score}, {pattern}; embeddings and the LM head are dense. The zeros are "
            f"stored in a plain dense checkpoint (the mask is the set of zero weights; its sha256 is "
            f"`{sp['mask_sha256'][:16]}…` in hubprune.json), so it loads and runs everywhere, at dense size and speed."
        )
    return " ".join(parts)


def _metric_text(record: PruneRecord) -> str:
    texts = {
        "angular_last": "the angular distance between the residual streams entering and leaving the block, "
        "on each calibration window's last token (Gromov et al. 2024): the block that changes them least",
        "angular_all": "the angular distance between the residual streams entering and leaving the block, "
        "averaged over every calibration token (after Gromov et al. 2024)",
        "block_influence": "ShortGPT's Block Influence (1 - cosine between a layer's input and output): "
        "the layers that change the residual stream least",
        "perplexity": "calibration perplexity with the block removed (as SLEB and Shortened LLaMA do): "
        "the block whose removal costs least",
        "explicit": "hand (an explicit list in the recipe)",
    }
    text = texts.get(record.metric, record.metric)
    calib = record.calibration
    if calib.get("tokens"):
        text += f", measured on {calib['tokens']:,} calibration tokens ({calib.get('source', 'text')})"
    return text


def _task_pairs(record: PruneRecord) -> list[tuple[str, float, float, float]]:
    ev = record.evaluation
    original, pruned = ev.get("original", {}).get("tasks", {}), ev.get("pruned", {}).get("tasks", {})
    return [
        (name, original[name]["acc_norm"], pruned[name]["acc_norm"], pruned[name].get("chance", 0.0))
        for name in pruned
        if name in original
    ]


def _perplexities(record: PruneRecord) -> tuple[float, float] | None:
    ev = record.evaluation
    before, after = ev.get("original", {}).get("perplexity"), ev.get("pruned", {}).get("perplexity")
    return (before, after) if before and after else None


def _eval_rows(record: PruneRecord) -> list[dict]:
    rows = [
        {
            "name": f"{name} acc_norm",
            "original": f"{o:.4f}",
            "pruned": f"{p:.4f}",
            "kept": f"{(p - c) / (o - c):.0%} above chance" if o > c else f"{p / o:.0%}",
        }
        for name, o, p, c in _task_pairs(record)
    ]
    ppl = _perplexities(record)
    if ppl:
        rows.append(
            {
                "name": "held-out perplexity (lower is better)",
                "original": f"{ppl[0]:.2f}",
                "pruned": f"{ppl[1]:.2f}",
                "kept": f"x{ppl[1] / ppl[0]:.2f}",
            }
        )
    return rows + _chat_rows(record.evaluation.get("chat"))


def _chat_rows(chat: dict | None) -> list[dict]:
    if not chat:
        return []
    what = "chat answers" if chat["mode"] == "chat" else "continuations"
    return [
        {
            "name": f"{what}: top-1 agreement with the original",
            "original": "1",
            "pruned": f"{chat['top1_agreement']:.3f}",
            "kept": f"{chat['top1_agreement']:.0%}",
        },
        {
            "name": f"{what}: KL(original ‖ this), nats/token",
            "original": "0",
            "pruned": f"{chat['kl']:.3f}",
            "kept": "",
        },
        {
            "name": f"{what} that loop (a word 4-gram 3+ times)",
            "original": f"{chat['original_loop_rate']:.0%}",
            "pruned": f"{chat['loop_rate']:.0%}",
            "kept": "",
        },
        {
            "name": f"{what} that end within {chat['max_new_tokens']} tokens",
            "original": f"{chat['original_eos_rate']:.0%}",
            "pruned": f"{chat['eos_rate']:.0%}",
            "kept": "",
        },
    ]


def _eval_note(record: PruneRecord) -> str:
    ev = record.evaluation
    parts = ["Zero-shot, scored as lm-evaluation-harness scores them (acc_norm: log-likelihood per character)."]
    if ev.get("backend") == "lm-eval":
        parts[0] = (
            "Zero-shot, scored by lm-evaluation-harness itself (acc_norm; acc where a task reports no acc_norm)."
        )
    if ev.get("command"):
        parts.append(f"Measured with `{ev['command']}`.")
    if ev.get("heldout"):
        parts.append(f"Perplexity on {ev['heldout']}.")
    if ev.get("chat"):
        chat = ev["chat"]
        parts.append(
            f"Answers: the original answered {chat['source']} greedily (held out from healing); this model "
            f"is scored teacher-forced on those {chat['answer_tokens']:,} answer tokens, and on its own "
            "greedy answers for loops and endings."
        )
    return " ".join(parts) if _task_pairs(record) else " ".join(parts[1:])


def _eval_results(record: PruneRecord) -> list:
    from huggingface_hub import EvalResult

    results = []
    for name, original, pruned, _ in _task_pairs(record):
        for value, metric_name in ((pruned, "acc_norm"), (original, f"acc_norm of the original {base_name(record)}")):
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="Zero-shot multiple choice",
                    dataset_type=name,
                    dataset_name=name,
                    metric_type="acc_norm",
                    metric_value=round(value, 4),
                    metric_name=metric_name,
                )
            )
    ppl = _perplexities(record)
    if ppl:
        for value, metric_name in (
            (ppl[1], "perplexity"),
            (ppl[0], f"perplexity of the original {base_name(record)}"),
        ):
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="Language modelling",
                    dataset_type="heldout",
                    dataset_name=record.evaluation.get("heldout", "held-out text"),
                    metric_type="perplexity",
                    metric_value=round(value, 3),
                    metric_name=metric_name,
                )
            )
    return results


def _size_rows(record: PruneRecord, config: dict, folder: Path) -> list[dict]:
    L, kept = record.base_num_layers, record.num_layers
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    width = _BYTES.get(dtype, 4)
    rows = [
        _change_row("decoder layers", L, kept, str),
        _change_row("parameters", record.parameters_before, record.parameters_after, _millions),
        *(
            [
                _change_row(
                    "nonzero parameters",
                    record.parameters_before,
                    record.parameters_after - record.sparsity["zeros"],
                    _millions,
                )
            ]
            if record.sparsity
            else []
        ),
        _change_row(
            f"weights in memory ({dtype})", record.parameters_before * width, record.parameters_after * width, _bytes
        ),
    ]
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads") or config.get("n_head")
    head_dim = config.get("head_dim") or (config.get("hidden_size") or config.get("n_embd") or 0) // max(1, heads or 1)
    if heads and head_dim:
        per_layer = 2 * heads * head_dim * width * 1000  # keys and values for 1,000 tokens
        rows.append(_change_row(f"KV cache per 1,000 tokens ({dtype})", per_layer * L, per_layer * kept, _bytes))
    disk_after = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    base = Path(record.origin.get("path", ""))
    disk_before = sum(p.stat().st_size for p in base.glob("*.safetensors")) if base.is_dir() else 0
    if disk_after and disk_before:
        rows.append(_change_row("safetensors on disk", disk_before, disk_after, _bytes))
    return rows


def _speed_rows(record: PruneRecord) -> list[dict]:
    speed = record.evaluation.get("speed", {})
    rows = []
    for name, (before, after) in speed.get("figures", {}).items():
        rows.append(
            {"name": name, "original": f"{before:.1f}", "pruned": f"{after:.1f}", "ratio": f"{after / before:.2f}x"}
        )
    return rows


def _healing_rows(record: PruneRecord) -> list[dict]:
    h = record.healing
    if not h:
        return []
    c = h.get("config", {})
    rows = [
        ("method", _method_text(h)),
        ("steps", f"{h['steps']} ({h['tokens']:,} tokens)"),
        (
            "text",
            f"{h['data'].get('source', '?')}, never the evaluation text"
            + (" (only the answer tokens are learnt)" if h["data"].get("text") == "chat" else ""),
        ),
        (
            "LoRA",
            f"r={c.get('lora_r')}, alpha={c.get('lora_alpha')}, "
            f"on {', '.join(c.get('target_modules') or ['the family default projections'])}",
        ),
        ("learning rate", f"{c.get('learning_rate')} (warm-up {c.get('warmup_steps')} steps, cosine)"),
        ("batch", f"{c.get('batch_size')} x {c.get('seq_len')} tokens x {c.get('grad_accum')} accumulation"),
        *_refit_rows(h.get("refit", {})),
        ("loss", f"{h['first_loss']:.3f} -> {h['final_loss']:.3f}"),
        ("time", f"{h['seconds']:.0f} s at {h['tokens_per_second']:.0f} tokens/s"),
    ]
    return [{"name": k, "value": v} for k, v in rows]


def _refit_rows(refit: dict) -> list[tuple[str, str]]:
    # One row per repaired gap: which layer's MLP output projection was refit, and how well it fits.
    return [
        (
            "refit",
            f"layer {g['refit_layer']} {g['module']} refit by least squares for the removed "
            f"[{g['removed'][0]}, {g['removed'][1]}) ({refit['tokens']:,} tokens; fit error "
            f"{g['relative_error_before']:.2f} -> {g['relative_error_after']:.2f})",
        )
        for g in refit.get("gaps", [])
    ]


def _divergence_name(config: dict) -> str:
    name = config.get("divergence", "forward")  # records written before heal.divergence: forward KL
    return {"forward": "KL", "reverse": "reverse KL", "jsd": "Jensen-Shannon"}.get(name, name)


def _method_text(h: dict) -> str:
    c = h.get("config", {})
    text = "QLoRA (4-bit NF4)" if c.get("method") == "qlora" else "LoRA"
    if c.get("distill"):
        text += (
            f" with distillation from the original ({_divergence_name(c)} weight"
            f" {c['distill']}, temperature {c.get('temperature', 1.0)})"
        )
    return text


def _datasets(record: PruneRecord) -> list[str]:
    names = []
    for source in (record.calibration.get("source", ""), record.healing.get("data", {}).get("source", "")):
        if source.endswith("corpus (calibration split)") or source.endswith("corpus (train split)"):
            corpus = source.split()[0]
            if corpus in CORPUS_DATASETS:
                names.append(CORPUS_DATASETS[corpus])
        elif source.startswith("dataset ") and "/" in source and not Path(source[8:]).exists():
            names.append(source[8:])
    return list(dict.fromkeys(names))


def _license(card: dict) -> dict:
    license_ = card.get("license")
    if not license_:
        return {}
    if license_ == "other" or license_ not in HUB_LICENSES:
        return {
            "license": "other",
            "license_name": card.get("license_name") or str(license_),
            "license_link": card.get("license_link"),
        }
    return {"license": license_}


def _change_row(name: str, before: float, after: float, fmt) -> dict:
    return {"name": name, "original": fmt(before), "pruned": fmt(after), "change": f"{after / before - 1:+.1%}"}


def _millions(count: float) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def _bytes(count: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count:.0f} B"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
