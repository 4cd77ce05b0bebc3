"""``xlpeft train-lang``: train a language module with masked-language modelling.

Everything a user can get wrong (pack, method, --set keys, corpus, base) is checked before an
MLflow run is opened, so a bad command leaves nothing behind in the tracking store.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from xlpeft.data.corpora import check_text_file, iter_lines
from xlpeft.data.mlm import batches, mask_tokens, pack_blocks, split_blocks
from xlpeft.io import Manifest
from xlpeft.models import load_base
from xlpeft.packs import load_language_pack
from xlpeft.recipes.common import base_ref, count_parameters, publish, resolve_configs, run_tags
from xlpeft.registry import get_method
from xlpeft.training import evaluate_mlm, mlm_loss, pick_device, train_loop


@dataclass(frozen=True)
class LangRequest:
    """What the user asked for on the command line."""

    lang: str
    method: str = "adapter"
    base: str = "xlmr"
    corpus: tuple[str, ...] = ()
    sets: dict[str, str] = field(default_factory=dict)  # --set key=value
    output: str | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    seed: int | None = None


@dataclass
class LangResult:
    path: Path
    run_id: str
    registered_name: str
    version: str
    metrics: dict[str, float]


def train_language(req: LangRequest) -> LangResult:
    """Train, save, log and register a language module; returns where it went."""
    from xlpeft import tracking

    # ---- setup: validate everything before an MLflow run exists
    pack = load_language_pack(req.lang)
    spec = get_method(req.method)
    method_cfg, cfg = resolve_configs(
        req.method, "language", req.sets, {"max_steps": req.max_steps, "batch_size": req.batch_size, "seed": req.seed}
    )
    corpora = pack.resolve(list(req.corpus))
    for c in corpora:
        if c.path:
            check_text_file(Path(c.path))
    device = pick_device(cfg.device)
    base = load_base(req.base, device=device)
    lines = itertools.chain.from_iterable(iter_lines(c, cfg.max_corpus_lines) for c in corpora)
    blocks = pack_blocks(base.tokenizer, lines, cfg.max_seq_len)
    train_blocks, eval_blocks = split_blocks(blocks, cfg.eval_fraction, cfg.seed)
    out_dir = Path(req.output or f"modules/lang-{req.lang}-{req.method}")
    name = tracking.registered_name("language", req.lang, req.method)
    tags = run_tags("language", req.lang, None, req.method, base)
    params = {
        "method": asdict(method_cfg), "train": asdict(cfg), "lang": req.lang, "base": base.name,
        "corpora": ", ".join(c.describe() for c in corpora), "train_blocks": len(train_blocks),
        "eval_blocks": len(eval_blocks),
    }

    # ---- train
    with tracking.tracked_run(f"lang-{req.lang}-{req.method}", tags, params) as tracker:
        torch.manual_seed(cfg.seed)
        trainable = spec.prepare(base, method_cfg, cfg)
        mask_gen = torch.Generator().manual_seed(cfg.seed)
        data = batches(train_blocks, cfg.batch_size, torch.Generator().manual_seed(cfg.seed))

        def loss_fn(batch: torch.Tensor) -> torch.Tensor:
            inputs, labels = mask_tokens(batch, base.tokenizer, cfg.mlm_probability, mask_gen)
            return mlm_loss(base, inputs.to(device), labels.to(device))

        def evaluate() -> dict[str, float]:
            return evaluate_mlm(base, eval_blocks, base.tokenizer, cfg)

        before = evaluate()
        tracker.log_metrics({f"{k}_before": v for k, v in before.items()}, 0)
        base.model.train()
        done = 0
        summary: dict[str, Any] = {}
        for phase in trainable.phases:
            params_ = trainable.begin_phase(phase)
            result = train_loop(
                params_, data, loss_fn, cfg, phase.steps, tracker.log_metrics, evaluate,
                after_step=lambda step, p=phase: trainable.after_step(p, step), desc=f"{req.lang} {phase.name}",
                step_offset=done,
            )
            done += phase.steps
            phase_metrics = {f"{phase.name}_steps_per_second": result.steps_per_second, **trainable.end_phase(phase)}
            tracker.log_metrics(phase_metrics, done)
            summary[phase.name] = {"steps": phase.steps, "last_loss": result.last_loss, "seconds": result.seconds}
        base.model.eval()
        after = evaluate()
        tracker.log_metrics(after, done)
        tensors, extra = trainable.export()
        trainable.close()

        # ---- save, verify, log, register
        manifest = Manifest(
            kind="language", method=req.method, lang=req.lang, base=base_ref(base), config=asdict(method_cfg),
            trainable_parameters=count_parameters(tensors, extra),
            training={"steps": done, "phases": summary, "seed": cfg.seed, "train": asdict(cfg),
                      "corpora": [c.describe() for c in corpora], "eval_loss_before": before["eval_loss"], **after},
            extra=extra,
        )
        version = publish(tracker, out_dir, manifest, tensors, name, tags, done)
    return LangResult(out_dir, tracker.run_id, name, version, after)
