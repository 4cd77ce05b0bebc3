"""``xlpeft compose --lang X --ensemble tr,id [--emea]``: a target language scored through other languages' modules.

For a language with no module of its own, the task module runs over each listed language's
module and the outputs are averaged (:mod:`xlpeft.ensemble`); with ``--emea`` the weights adapt
per batch by entropy minimisation (Wang et al. 2021). The score is logged next to the baseline
(the task module over its own source-language module) and each member alone, so the run says
whether the ensemble helped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from xlpeft import tracking
from xlpeft.compose import compose
from xlpeft.ensemble import EnsembleConfig, build_ensemble
from xlpeft.errors import XlpeftError
from xlpeft.evaluation import eval_examples, evaluate_model, score
from xlpeft.lineage import baseline_stack, registered_ref
from xlpeft.metrics import METRICS
from xlpeft.models import load_base
from xlpeft.packs import language_name, load_task_pack


@dataclass(frozen=True)
class EnsembleRequest:
    lang: str  # the target language (evaluated); it needs no module
    task: str
    members: tuple[str, ...]  # languages whose registered modules form the ensemble
    base: str
    lang_method: str | None = None
    task_method: str | None = None
    eval_data: str | None = None
    split: str | None = None
    config: EnsembleConfig = field(default_factory=EnsembleConfig)


@dataclass
class EnsembleResult:
    run_id: str | None
    metric: str
    metrics: dict[str, float]
    baseline: dict[str, float]
    baseline_lang: str | None
    members: dict[str, dict[str, float]]  # each member language alone under the task module
    evaluated_on: str | None
    weights: list[float] | None  # α of the last batch (EMEA), None for the plain average


def compose_ensemble(req: EnsembleRequest) -> EnsembleResult:
    """Evaluate the task module over an ensemble of language modules on ``req.lang``'s data, against the baseline."""
    if len(set(req.members)) != len(req.members):
        raise XlpeftError(f"--ensemble lists a language twice: {','.join(req.members)}; list each once")
    pack = load_task_pack(req.task)
    base = load_base(req.base)
    members = [registered_ref("language", lang, req.lang_method, base.fingerprint)[0] for lang in req.members]
    task, task_reg = registered_ref("task", req.task, req.task_method, base.fingerprint)
    examples, evaluated_on = eval_examples(pack, req.lang, req.eval_data, req.split)
    if examples is None:
        raise XlpeftError(f"no {req.task} evaluation data for {req.lang}: an ensemble is scored, not saved; pass "
                          "--eval-data FILE or use a language whose pack has a split")
    kind = "emea" if req.config.emea_steps else "average"
    tags = {
        "xlpeft.kind": "composition", "xlpeft.lang": req.lang, "xlpeft.task": req.task, "xlpeft.base": base.name,
        "xlpeft.base_fingerprint": base.fingerprint, "xlpeft.method": "+".join(m.method for m in [*members, task]),
        "xlpeft.ensemble": ",".join(req.members), "xlpeft.ensemble_kind": kind, "xlpeft.lang_name": language_name(req.lang),
        "xlpeft.parent.task_module": task.source, "xlpeft.parent.task_run": task_reg.run_id,
        "xlpeft.parent.lang_modules": ", ".join(m.source for m in members),
    }
    params = {"lang": req.lang, "task": req.task, "base": base.name, "ensemble": ",".join(req.members),
              "task_module": task.source, "eval_data": evaluated_on, **{f"ensemble.{k}": v for k, v in asdict(req.config).items()}}
    with tracking.tracked_run(f"ensemble-{req.lang}-{req.task}-{kind}", tags, params) as tracker:
        model = build_ensemble(base, members, task, req.config)
        metrics = score(pack, examples, model.predict(pack, examples))  # each member through its own tokenizer
        tracker.log_metrics({f"eval_{k}": v for k, v in metrics.items()}, 0)
        alone = {}
        for lang, member in zip(req.members, members, strict=True):
            single = compose(base, [member.module, task.module])
            alone[lang] = evaluate_model(single, pack, single.xlpeft_tokenizer, examples)
            tracker.log_metrics({f"member_{lang}_{k}": v for k, v in alone[lang].items()}, 0)
        reference = baseline_stack(task.module, base.fingerprint)
        reference_model = compose(base, reference)
        baseline = evaluate_model(reference_model, pack, reference_model.xlpeft_tokenizer, examples)
        tracker.log_metrics({f"baseline_{k}": v for k, v in baseline.items()}, 0)
        baseline_lang = reference[0].manifest.lang if len(reference) > 1 else None
        tracker.set_tags({"xlpeft.baseline_lang": baseline_lang or "none"})
        weights = model.last_weights.tolist() if req.config.emea_steps and model.last_weights is not None else None
    return EnsembleResult(tracker.run_id, METRICS[pack.metric], metrics, baseline, baseline_lang, alone,
                          evaluated_on, weights)
