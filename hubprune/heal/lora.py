"""Heal a pruned model: LoRA (or 4-bit QLoRA) on the kept layers, optionally distilled.

With ``refit`` (the default, when the removed layers and the original are known), each gap
is first repaired in closed form (``hubprune.heal.refit``); LoRA training then starts from there.
The loss is ``(1 - distill) * LM + distill * T^2 * KL(teacher || student)`` on the token
distributions at temperature T (``heal.divergence`` picks reverse KL or Jensen-Shannon instead);
the teacher (the unpruned original) runs once per batch without gradients. Training runs on one
device or, under ``accelerate launch``, on several (gradients all-reduced, each process reading
its own share of every batch).
Checkpoints (the LoRA weights, optimizer, scheduler and step) are written atomically
every ``checkpoint_every`` steps; a rerun with the same config resumes from the last one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hubprune.architecture.families import family_of
from hubprune.calibration import TokenWindows, check_disjoint
from hubprune.config import HEAL_DIVERGENCES, HealConfig
from hubprune.eval.scoring import scored_logits
from hubprune.heal.data import healing_windows, micro_batch, refit_window_count
from hubprune.heal.fourbit import is_4bit, quantized_copy, require_qlora
from hubprune.heal.onpolicy import on_policy_batch, on_policy_count, on_policy_questions, on_policy_step
from hubprune.heal.refit import can_refit, refit_gaps
from hubprune.loading import native_bfloat16
from hubprune.methods.sparsity import apply_masks

logger = logging.getLogger(__name__)


CHECKPOINT_FILE = "heal_checkpoint.json"  # names its tensors file (safetensors); no pickle is ever loaded


@dataclass
class HealReport:
    """What healing did: steps, tokens, speed, losses, and the text it read."""

    method: str
    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float
    first_loss: float
    final_loss: float
    resumed_from: int = 0
    precision: str = "float32"  # what the training passes ran in (heal.precision resolved)
    masked: int = 0  # sparse projections whose zeros were re-applied after the merge
    refit: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def heal_model(
    model: nn.Module,
    tokenizer,
    config: HealConfig,
    *,
    teacher: nn.Module | None = None,
    data: Any = None,
    eval_texts: list[str] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    adapter_dir: str | os.PathLike | None = None,
    removed: list[int] | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> tuple[nn.Module, HealReport]:
    """Train LoRA adapters on ``model``'s kept layers, merge them, and return the healed model.

    ``model``'s modules are changed in place (pass a copy if the original must survive); the
    weights it shares with another model (``copy_sharing_weights``) are copied before merging.
    ``data``: a list of strings, file path(s), a ``datasets.Dataset``, or None for ``config.data``.
    ``eval_texts``: the evaluation text, refused if it shares a document with the healing text.
    ``removed``: the original's 0-based layers missing from ``model``; with ``teacher`` (the
    original) it lets ``config.refit`` repair each gap before training.
    ``masks``: module name -> bool tensor (True = kept) of a sparse model; the merged weights
    are zeroed where a mask is False, so the sparsity pattern survives healing.

    Example: ``healed, report = heal_model(pruned.model, tok, HealConfig(steps=100, distill=0.5), teacher=original)``
    """
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    if config.distill > 0 and teacher is None:
        raise ValueError("heal.distill > 0 needs the original model as teacher; pass teacher= or set distill: 0")
    if config.method == "qlora":
        require_qlora()
    # cpu=True lets `accelerate launch --multi_gpu --num_processes N` (or torchrun) train on N CPU processes.
    on_cpu = next(model.parameters()).device.type == "cpu"
    accelerator = Accelerator(cpu=on_cpu, gradient_accumulation_steps=config.grad_accum)
    world, rank = accelerator.num_processes, accelerator.process_index
    if teacher is not None:
        teacher = teacher.to(accelerator.device).eval()
    windows = healing_windows(
        tokenizer, config, data, world, teacher, progress and accelerator.is_local_main_process, student=model
    )
    if eval_texts is not None:
        check_disjoint(windows.texts, eval_texts)
    refit = _refit(model, teacher, removed, windows, config, progress and accelerator.is_local_main_process)
    if not config.distill:
        teacher = None  # only the refit needed it

    targets = list(config.target_modules or family_of(model).lora_targets)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    student = quantized_copy(model) if config.method == "qlora" else model
    student.config.use_cache = False  # type: ignore[union-attr]  # a transformers model
    torch.manual_seed(config.seed)  # the LoRA initialisation; the data order has its own generator
    peft_model = get_peft_model(student, lora)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(config.warmup_steps, config.steps))
    # The scheduler is not prepared: accelerate would step it once per process.
    peft_model, optimizer = accelerator.prepare(peft_model, optimizer)

    key = _config_key(config, model, windows)
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None
    start, losses = 0, []
    if checkpoint is not None and checkpoint.is_file():
        state = _load_checkpoint(checkpoint, key)
        if state["key"] != key:
            raise ValueError(
                f"the checkpoint in {checkpoint.parent} was made by a different heal config or model; "
                "rerun with the same settings, or delete that folder to start over"
            )
        set_peft_model_state_dict(accelerator.unwrap_model(peft_model), state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, losses = state["step"], state["losses"]
        logger.info("resuming healing from step %d of %d (%s)", start, config.steps, checkpoint)

    questions = on_policy_questions(tokenizer, windows.prompts or [], config.seq_len) if config.on_policy else []
    peft_model.train()
    bfloat16 = config.precision == "bfloat16" or (config.precision == "auto" and native_bfloat16(accelerator.device))
    autocast = torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=bfloat16)
    tokens_per_step = config.batch_size * config.grad_accum * world * windows.ids.size(1)
    bar = tqdm(
        total=config.steps,
        initial=start,
        desc=f"heal ({config.method}{', distill' if config.distill else ''}{', bfloat16' if bfloat16 else ''})",
        unit="step",
        disable=not progress or not accelerator.is_local_main_process,
    )
    started, read = time.perf_counter(), 0  # tokens read by this run's steps (on-policy rows vary in length)
    for step in range(start, config.steps):
        step_loss = 0.0
        own = on_policy_step(step, config.on_policy)
        learn: torch.Tensor | None
        for micro in range(config.grad_accum):
            if own:  # the pruned model answers this step's questions itself, as it stands now
                index = (on_policy_count(step, config.on_policy) * config.grad_accum + micro) * world + rank
                batch, learn = on_policy_batch(
                    accelerator.unwrap_model(peft_model), tokenizer, questions, index, config
                )
            else:
                index = (step - on_policy_count(step, config.on_policy)) * config.grad_accum + micro
                batch, learn = micro_batch(windows, index, config, rank, world)
            read += batch.numel() * world
            batch, learn = batch.to(accelerator.device), None if learn is None else learn.to(accelerator.device)
            with accelerator.accumulate(peft_model), autocast:
                loss = healing_loss(peft_model, teacher, batch, config, learn)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                scheduler.step()
            step_loss += loss.item() / config.grad_accum
        losses.append(float(accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), "mean")))
        elapsed = time.perf_counter() - started
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{read / elapsed:.0f}")
        if checkpoint is not None and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            if accelerator.is_main_process:
                _save_checkpoint(
                    checkpoint,
                    {
                        "key": key,
                        "step": step + 1,
                        "losses": losses,
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "lora": get_peft_model_state_dict(accelerator.unwrap_model(peft_model)),
                    },
                )
            accelerator.wait_for_everyone()
    bar.close()
    seconds = time.perf_counter() - started

    peft_model = accelerator.unwrap_model(peft_model)
    if adapter_dir is not None and accelerator.is_main_process:
        peft_model.save_pretrained(adapter_dir)
    loaded_4bit = config.method == "qlora" and is_4bit(model)
    if config.method == "qlora" and not loaded_4bit:  # merge into the full-precision weights, not the 4-bit ones
        adapter = get_peft_model_state_dict(peft_model)
        peft_model = get_peft_model(model, lora)
        set_peft_model_state_dict(peft_model, adapter)
    # A model loaded in 4-bit (hubprune.heal.qlora) comes back unmerged: its adapter is merged at file level.
    if not loaded_4bit:
        _own_base_weights(peft_model)
    healed = peft_model if loaded_4bit else peft_model.merge_and_unload()
    if masks and not loaded_4bit:  # the LoRA delta is dense: zero it where the pruned weights are zero
        apply_masks(healed, masks)
    healed.config.use_cache = True  # type: ignore[union-attr]  # a transformers model
    healed.eval().requires_grad_(False)
    done = config.steps - start
    report = HealReport(
        method=config.method + ("+distill" if config.distill else ""),
        steps=config.steps,
        tokens=start * tokens_per_step + read,  # steps before a resume counted as full windows
        seconds=round(seconds, 1),
        tokens_per_second=round(read / seconds, 1) if done else 0.0,
        first_loss=losses[0] if losses else math.nan,
        final_loss=losses[-1] if losses else math.nan,
        resumed_from=start,
        precision="bfloat16" if bfloat16 else "float32",
        masked=len(masks or {}) if not loaded_4bit else 0,
        refit=refit,
        config=asdict(replace(config, data=None)),  # type: ignore[arg-type]  # the record leaves the data out
        data={
            "text": "prose" if windows.loss_mask is None else "chat",
            "source": windows.source,
            "windows": len(windows.ids),
            "on_policy_steps": on_policy_count(config.steps, config.on_policy),
            "tokens": windows.num_tokens,
            "fingerprint": windows.fingerprint(),
        },
    )
    return healed, report


def _own_base_weights(peft_model: nn.Module) -> None:
    """Give each LoRA layer's base weights their own storage, so that merging cannot write into
    tensors the model shares with another (the pruner's original). Done only just before the
    merge: training on the shared tensors is measurably faster on a CPU than on fresh copies."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            for name, param in list(base._parameters.items()):
                if param is not None:
                    base._parameters[name] = nn.Parameter(param.detach().clone(), requires_grad=False)


def healing_loss(
    model, teacher, batch: torch.Tensor, config: HealConfig, learn: torch.Tensor | None = None
) -> torch.Tensor:
    """``(1 - distill) * LM + distill * T^2 * D(teacher, model)`` of one batch, per learnt token.

    D is ``config.divergence`` (see ``divergence``)."""
    # `learn` ([B, T] bool, None for all): the tokens to learn; position t is scored when token t+1 is one.
    scored = torch.ones_like(batch, dtype=torch.bool) if learn is None else learn
    scored = F.pad(scored[:, 1:], (0, 1), value=False)  # the last position predicts nothing
    labels = batch[:, 1:][scored[:, :-1]]
    count = scored.sum().clamp(min=1)  # a batch with nothing to learn adds 0, not NaN
    logits = scored_logits(model, scored, input_ids=batch)  # [N, V]
    lm = F.cross_entropy(logits, labels, reduction="sum") / count
    if not config.distill:
        return lm
    with torch.no_grad():
        target = scored_logits(teacher, scored, input_ids=batch)
    t = config.temperature
    d = divergence(target / t, logits / t, config.divergence)
    return (1 - config.distill) * lm + config.distill * d / count * t * t  # per scored token


def divergence(teacher_logits: torch.Tensor, logits: torch.Tensor, kind: str = "forward") -> torch.Tensor:
    """The divergence of the model's next-token distributions ``q`` from the teacher's ``p``,
    summed over the rows of the ``[N, V]`` logits.

    ``forward`` is KL(p || q), which spreads q over everything p allows (the classic distillation
    loss); ``reverse`` is KL(q || p), which pulls q onto p's main modes (MiniLLM, Gu et al. 2024);
    ``jsd`` is the Jensen-Shannon divergence with the mixture m = (p + q) / 2 (GKD's beta 0.5,
    Agarwal et al. 2024), between the two.
    """
    log_p = F.log_softmax(teacher_logits, -1)
    log_q = F.log_softmax(logits, -1)
    if kind == "forward":
        return F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    if kind == "reverse":
        return (log_q.exp() * (log_q - log_p)).sum()
    if kind == "jsd":
        log_m = torch.logaddexp(log_p, log_q) - math.log(2)  # no stacked copy of the [N, V] logits
        return (log_p.exp() * (log_p - log_m)).sum() / 2 + (log_q.exp() * (log_q - log_m)).sum() / 2
    raise ValueError(f"heal.divergence {kind!r} is unknown; choose one of {', '.join(HEAL_DIVERGENCES)}")


def _refit(
    model: nn.Module,
    teacher: nn.Module | None,
    removed: list[int] | None,
    windows: TokenWindows,
    config: HealConfig,
    progress: bool,
) -> dict:
    """Refit the layer before each gap in place (hubprune.heal.refit) where the config asks and it can be done."""
    if not config.refit:
        return {}
    reason = (
        "the weights are trained in 4-bit"
        if config.method == "qlora"
        else "the removed layers are not known"
        if removed is None
        else "no original model (teacher) was given"
        if teacher is None
        else f"{family_of(model).name} normalises its MLP output"
        if not can_refit(model)
        else None
    )
    if reason or teacher is None or removed is None:
        logger.info("heal.refit skipped: %s", reason)
        return {"skipped": reason}
    report = refit_gaps(
        model,
        teacher,
        removed,
        windows.ids[: refit_window_count(config)],
        ridge=config.refit_ridge,
        batch_size=config.batch_size,
        progress=progress,
    )
    return report.to_dict()


def _warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _config_key(config: HealConfig, model: nn.Module, windows: TokenWindows) -> str:
    text = json.dumps(
        [
            asdict(replace(config, checkpoint_every=1, keep_adapter=False)),
            model.config.to_dict(),  # type: ignore[union-attr,operator]  # a transformers model
            windows.fingerprint(),
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _save_checkpoint(path: Path, state: dict) -> None:
    """The LoRA and optimizer tensors as safetensors (a file per step), everything else as JSON that names
    that file; each written to a temporary file and renamed, the JSON last, so a kill leaves the last one whole."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    optimizer = state["optimizer"]
    tensors = {f"lora/{k}": v for k, v in state["lora"].items()}
    scalars: dict[str, dict] = {}
    for index, values in optimizer["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    tensor_file = f"heal_checkpoint-{state['step']}.safetensors"
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", delete=False) as f:
        pass
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, f.name)
    os.replace(f.name, path.parent / tensor_file)
    meta = {
        "key": state["key"],
        "step": state["step"],
        "losses": state["losses"],
        "tensors": tensor_file,
        "param_groups": optimizer["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": state["scheduler"],
    }
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".tmp-", delete=False) as meta_file:
        json.dump(meta, meta_file)
    os.replace(meta_file.name, path)
    for old in path.parent.glob("heal_checkpoint-*.safetensors"):
        if old.name != tensor_file:
            old.unlink()


def _load_checkpoint(path: Path, key: str) -> dict:
    """A checkpoint written by ``_save_checkpoint``, read back as the state dicts it was made of."""
    from safetensors.torch import load_file

    try:
        meta = json.loads(path.read_text())
        if meta.get("key") != key:
            return {"key": meta.get("key")}
        tensor_file = path.parent / Path(meta["tensors"]).name  # a bare name: never a path elsewhere
        tensors = load_file(tensor_file)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"the healing checkpoint in {path.parent} cannot be read ({err}); delete that folder to start over"
        ) from None
    lora = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("lora/")}
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer/"):
            _, index, field_name = name.split("/", 2)
            state.setdefault(int(index), {})[field_name] = value
    for index, values in meta["optimizer_scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {
        "key": meta["key"],
        "step": meta["step"],
        "losses": meta["losses"],
        "lora": lora,
        "optimizer": {"state": state, "param_groups": meta["param_groups"]},
        "scheduler": meta["scheduler"],
    }
