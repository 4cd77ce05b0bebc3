"""The one training loop every recipe uses, the phases and checkpoints around it, and the losses.

Explicit on purpose (no Trainer): AdamW over the method's parameters only, linear warm-up then
linear decay, gradient accumulation, clipping, a progress bar, periodic logging/eval.
:func:`run_phases` drives a method's phases through it with checkpoints and exact resume;
:func:`mlm_loss` and :func:`task_loss` are the two objectives (language and task modules).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xlpeft.checkpoint import optimizer_state, restore_rng, rng_state, save_checkpoint
from xlpeft.config import TrainConfig
from xlpeft.distributed import Dist
from xlpeft.interrupts import poll
from xlpeft.progress import progress as progress_bar
from xlpeft.recompute import checkpointed_activations


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def mlm_loss(base, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
             num_labelled: int | None = None) -> torch.Tensor:
    """Cross-entropy over masked positions only.

    The vocabulary projection (H x |V|, |V| = 120k-250k for multilingual encoders) dominates
    the cost of an MLM step; computing logits for the ~15% selected positions instead of
    all of them avoids ~85% of that work. Hooks on the head (e.g. the invertible adapter's
    inverse) still apply because the head module itself is called.

    Args:
        input_ids: (B, T) corrupted ids (after :func:`~xlpeft.data.mlm.mask_tokens`).
        labels: (B, T), -100 where nothing is predicted.
        attention_mask: (B, T) from the *uncorrupted* batch; None means "non-pad of ``input_ids``"
            (only right when no replacement can be a pad, which ``mask_tokens`` guarantees).
        num_labelled: divide the summed CE by this count instead of the local one; data-parallel
            ranks pass the global batch's count so summed gradients equal one process's.
    """
    if attention_mask is None:
        attention_mask = (input_ids != base.tokenizer.pad_token_id).long()  # (B, T)
    hidden = base.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    selected = labels != -100  # (B, T)
    if not bool(selected.any()):
        return hidden.sum() * 0.0
    logits = base.mlm_head(hidden[selected])  # (M, V), M = number of masked positions
    total = F.cross_entropy(logits.float(), labels[selected], reduction="sum")
    return total / (num_labelled if num_labelled is not None else int(selected.sum()))


def task_logits(base, head: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The task head over the (module-carrying) encoder: (B, T, L) token logits or (B, L) sequence logits."""
    hidden = base.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return head(hidden)  # (B, T, L) or (B, L)


def labelled_count(labels: torch.Tensor) -> int:
    """Positions that carry a label in (B, T) token labels or (B,) sequence labels."""
    return int((labels != -100).sum())


def task_loss(base, head: nn.Module, batch: dict[str, torch.Tensor], num_labelled: int | None = None) -> torch.Tensor:
    """Summed cross-entropy over labelled positions divided by ``num_labelled`` (default: this batch's count).

    Data-parallel ranks pass the global micro-batch's count, so summed gradients equal one process's.
    """
    logits = task_logits(base, head, batch)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1),
                            ignore_index=-100, reduction="sum")
    return total / max(num_labelled if num_labelled is not None else labelled_count(batch["labels"]), 1)


def fit_train_config(cfg: TrainConfig, base, sets: dict) -> TrainConfig:
    """``cfg`` with ``max_seq_len`` fitted to the base's position table (:func:`xlpeft.models.fit_seq_len`).

    A default that is too long is lowered, with one stderr line; an explicit ``--set max_seq_len``
    that is too long is a :class:`~xlpeft.errors.ConfigError`. Call it before any run is opened.
    """
    import dataclasses
    import sys

    from xlpeft.models import fit_seq_len

    fitted = fit_seq_len(cfg.max_seq_len, base.model, explicit="max_seq_len" in sets)
    if fitted == cfg.max_seq_len:
        return cfg
    print(f"max_seq_len: {fitted} (the default {cfg.max_seq_len} is longer than base {base.name!r} can embed)",
          file=sys.stderr)
    return dataclasses.replace(cfg, max_seq_len=fitted)


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast where asked for (``auto``: on CUDA only); trainable parameters and AdamW stay fp32."""
    import contextlib

    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier for LambdaLR: 0 -> 1 over ``warmup`` steps, then 1 -> 0 linearly at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


@dataclass
class LoopResult:
    steps: int
    last_loss: float  # mean training loss over the final logging window
    seconds: float
    steps_per_second: float


@dataclass
class Resume:
    """Where an interrupted phase left off: its step, optimizer/scheduler state and loss window."""

    step: int
    optimizer: tuple[dict[str, torch.Tensor], dict]  # (tensors, meta) from checkpoint.optimizer_state
    scheduler: dict
    window: list[float]


def train_loop(
    params: list[nn.Parameter],
    batches: Iterator,
    loss_fn: Callable[[object], torch.Tensor],
    cfg: TrainConfig,
    steps: int,
    log: Callable[[dict[str, float], int], None],
    evaluate: Callable[[], dict[str, float]] | None = None,
    after_step: Callable[[int], None] | None = None,
    desc: str = "train",
    step_offset: int = 0,
    resume: Resume | None = None,
    checkpoint: Callable[[int, torch.optim.Optimizer, object, list[float]], None] | None = None,
    sync_grads: Callable[[list[nn.Parameter], float], float | None] | None = None,
    progress: bool = True,
) -> LoopResult:
    """Run ``steps`` optimizer steps of AdamW on ``params``.

    Args:
        params: the only parameters updated; everything else stays frozen.
        batches: endless iterator of micro-batches, consumed ``cfg.grad_accum`` per step.
        loss_fn: micro-batch -> scalar loss.
        cfg: optimisation settings (lr, warm-up, accumulation, clipping, logging, checkpoints).
        steps: optimizer steps for this phase.
        log: receives metric dicts with the global step (``step_offset + step``).
        evaluate: called every ``cfg.eval_every`` steps (if > 0); its metrics are logged.
        after_step: method hook after each optimizer step (e.g. movement scores).
        resume: continue an interrupted phase from its checkpointed step.
        checkpoint: called every ``cfg.checkpoint_every`` steps with (step, optimizer, scheduler, loss window).
        sync_grads: sums gradients (and the step's loss, which it returns) across data-parallel ranks
            before clipping; ``loss_fn`` must then divide by the global batch's labelled count.
    """
    from xlpeft.checkpoint import check_finite_loss, restore_optimizer

    on_cuda = bool(params) and params[0].is_cuda
    # fused AdamW: one kernel for all parameters on CUDA (the CPU build has no fused path worth taking)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=on_cuda or None)
    autocast = autocast_context(cfg.precision, params[0].device if params else torch.device("cpu"))
    warmup = int(cfg.warmup_ratio * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, steps))
    window: list[float] = []
    start_step = 0
    if resume is not None:
        restore_optimizer(optimizer, *resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
        window, start_step = list(resume.window), resume.step
    last_loss = math.nan
    start = time.perf_counter()
    bar = progress_bar(total=steps, initial=start_step, desc=desc, unit="step", enabled=progress)  # lines in a log
    for step in range(start_step + 1, steps + 1):
        poll()  # a SIGTERM whose exception a garbage-collection callback swallowed stops the run here
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            with autocast():
                loss = loss_fn(next(batches)) / cfg.grad_accum
            loss.backward()
            step_loss += float(loss.detach())
        if sync_grads is not None:  # data parallel: sum gradients and the partial losses over ranks
            synced = sync_grads(params, step_loss)
            step_loss = step_loss if synced is None else synced
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        check_finite_loss(step_loss, step_offset + step, lr)  # before a NaN update reaches the weights
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step(step)
        window.append(step_loss)
        bar.update(1)
        if step % cfg.log_every == 0 or step == steps:
            last_loss = sum(window) / len(window)
            window.clear()
            bar.set_postfix(loss=f"{last_loss:.3f}")
            log({"loss": last_loss, "lr": lr}, step_offset + step)
        if evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step != steps:
            log(evaluate(), step_offset + step)
        if checkpoint is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != steps:
            checkpoint(step, optimizer, scheduler, window)
    bar.close()
    seconds = time.perf_counter() - start
    done = max(steps - start_step, 1)
    return LoopResult(steps=steps, last_loss=last_loss, seconds=seconds, steps_per_second=done / max(seconds, 1e-9))


# ---- a method's phases through the loop, with checkpoints, exact resume and data parallelism


@dataclass
class PhaseRun:
    """Everything the phase loop needs; one object so every recipe drives it the same way."""

    trainable: Any  # methods.base.Trainable
    extras: dict[str, nn.Module]  # dense modules trained alongside (a task head)
    data: Any  # resumable batch iterator with state_dict/load_state_dict
    generators: dict[str, torch.Generator]  # other RNGs to checkpoint (masking)
    loss_fn: Any
    evaluate: Any
    cfg: TrainConfig
    tracker: Any  # tracking.Tracker, or lifecycle.NullTracker on ranks > 0
    desc: str
    checkpoint_dir: Path | None
    dist: Dist
    model: nn.Module | None = None  # the base's model, for activation checkpointing (cfg.activation_checkpointing)


def run_phases(run: PhaseRun, resume: tuple[dict[str, torch.Tensor], dict] | None = None,
               state: dict[str, Any] | None = None) -> tuple[int, dict]:
    """Train every phase of the method; return (total steps, per-phase summary).

    With ``resume`` (a loaded checkpoint), phases already finished are skipped, the current one
    restarts at its checkpointed step with the exact optimizer, scheduler, RNG and data state.
    ``state`` is recipe data carried in every checkpoint (e.g. the loss before training).
    """
    phases = run.trainable.phases
    # the extras' initial values, for a phase that resets them (checkpointed: a resumed run restores them too)
    initial = {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in run.extras.items()}
    start_phase, summary, resume_state = 0, {}, None
    if resume is not None:
        start_phase, summary, resume_state = _restore(run, resume, state, initial)
    done = sum(p.steps for p in phases[:start_phase])
    checkpointing = run.cfg.activation_checkpointing and run.model is not None
    with checkpointed_activations(run.model, checkpointing):  # training steps only: evaluation runs without gradients
        for index in range(start_phase, len(phases)):
            phase = phases[index]
            resuming = resume_state is not None and index == start_phase
            if resuming:
                params = run.trainable.resume_phase(phase, _unprefix(resume[0], "trainable."))
            else:
                if phase.reset_extras:
                    for name, module in run.extras.items():
                        module.load_state_dict(initial[name])
                params = run.trainable.begin_phase(phase)
            params = params + [p for m in run.extras.values() for p in m.parameters()]
            result = train_loop(
                params, run.data, run.loss_fn, run.cfg, phase.steps, run.tracker.log_metrics, run.evaluate,
                after_step=lambda step, p=phase: run.trainable.after_step(p, step), desc=f"{run.desc} {phase.name}",
                step_offset=done, resume=resume_state if resuming else None,
                checkpoint=_checkpointer(run, index, done, summary, state or {}, initial),
                sync_grads=run.dist.sync_grads if run.dist.active else None, progress=run.dist.main,
            )
            done += phase.steps
            metrics = {f"{phase.name}_steps_per_second": result.steps_per_second, **run.trainable.end_phase(phase)}
            run.tracker.log_metrics(metrics, done)
            shared = run.trainable.replicated()
            if shared is not None:  # e.g. LT-SFT's mask: every rank must have chosen the same entries
                run.dist.same_everywhere(shared, f"the {phase.name} phase's selected state")
            summary[phase.name] = {"steps": phase.steps, "last_loss": result.last_loss, "seconds": result.seconds}
    return done, summary


def _restore(run: PhaseRun, resume: tuple[dict[str, torch.Tensor], dict], state: dict[str, Any] | None,
             initial: dict[str, dict[str, torch.Tensor]]) -> tuple[int, dict[str, Any], Resume]:
    """Put data, RNGs and extras back as checkpointed; (phase to resume, summary so far, loop position)."""
    tensors, meta = resume
    summary = {k: v for k, v in meta["summary"].items() if k not in (state or {})}
    run.data.load_state_dict(tensors)
    restore_rng(tensors, run.generators)
    run.dist.seed_dropout(run.cfg.seed, meta["done"])  # the checkpoint holds rank 0's stream; others re-seed
    for name, module in run.extras.items():
        module.load_state_dict(_unprefix(tensors, f"extra.{name}."))
        initial[name] = _unprefix(tensors, f"extra0.{name}.") or initial[name]
    return meta["phase"], summary, Resume(meta["step"], (tensors, meta["optimizer"]), meta["scheduler"], meta["window"])


def _checkpointer(run: PhaseRun, index: int, done: int, summary: dict[str, Any], state: dict[str, Any],
                  initial: dict[str, dict[str, torch.Tensor]]) -> Callable[..., None]:
    """The loop's ``checkpoint`` callback for phase ``index``: everything an exact resume needs, on rank 0."""

    def checkpoint(step: int, optimizer, scheduler, window) -> None:
        if run.checkpoint_dir is None or not run.dist.main:
            return
        tensors = {f"trainable.{k}": v for k, v in run.trainable.state_dict().items()}
        for name, module in run.extras.items():
            tensors.update({f"extra.{name}.{k}": v for k, v in module.state_dict().items()})
            tensors.update({f"extra0.{name}.{k}": v for k, v in initial[name].items()})
        opt_tensors, opt_meta = optimizer_state(optimizer)
        tensors.update(opt_tensors)
        tensors.update(rng_state(run.generators))
        tensors.update(run.data.state_dict())
        meta = {"phase": index, "step": step, "done": done + step, "optimizer": opt_meta,
                "scheduler": scheduler.state_dict(), "window": list(window), "summary": {**summary, **state}}
        save_checkpoint(run.checkpoint_dir, tensors, meta)
        run.tracker.log_metrics({"checkpoint_step": done + step}, done + step)

    return checkpoint


def _unprefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


MIN_EVAL_BATCHES = 4
"""The smallest held-out evaluation the automatic budget (``eval_tokens=0``) picks, in batches."""


def eval_block_count(cfg: TrainConfig, available: int) -> int:
    """How many held-out blocks one MLM evaluation reads: sized to the run, so a short run is not mostly evaluation.

    ``eval_tokens`` > 0 is the budget in tokens; 0 takes a fifth of the tokens the run trains on
    (steps x batch x accumulation x max_seq_len), at least :data:`MIN_EVAL_BATCHES` batches. Never more
    than ``eval_batches`` batches or than the held-out blocks there are.
    """
    if cfg.eval_tokens:
        wanted = math.ceil(cfg.eval_tokens / cfg.max_seq_len)
    else:
        trained = cfg.max_steps * cfg.batch_size * cfg.grad_accum  # blocks the run trains on
        wanted = max(MIN_EVAL_BATCHES * cfg.batch_size, math.ceil(trained / 5))
    return max(1, min(available, wanted, cfg.eval_batches * cfg.batch_size))


@torch.no_grad()
def evaluate_mlm(base, blocks: torch.Tensor, tokenizer, cfg: TrainConfig, limit: int | None = None) -> dict[str, float]:
    """Held-out MLM loss and perplexity over the first ``limit`` blocks (default: ``eval_batches`` batches), with a
    fixed masking seed so evaluations are comparable."""
    model = base.model
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    from xlpeft.data.mlm import attention_mask_for, mask_tokens

    total, count = 0.0, 0
    device = next(model.parameters()).device
    end = min(len(blocks), cfg.eval_batches * cfg.batch_size if limit is None else limit)
    for i in range(0, end, cfg.batch_size):
        clean = blocks[i:min(i + cfg.batch_size, end)]  # (B, T) uncorrupted: the attention mask comes from here
        inputs, labels = mask_tokens(clean, tokenizer, cfg.mlm_probability, generator)
        n = int((labels != -100).sum())
        if n == 0:
            continue
        mask = attention_mask_for(clean, tokenizer.pad_token_id).to(device)
        loss = mlm_loss(base, inputs.to(device), labels.to(device), mask)
        total += float(loss) * n
        count += n
    model.train(was_training)
    eval_loss = total / max(count, 1)
    return {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))}
