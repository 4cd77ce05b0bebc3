"""``xlpeft train-lang``: train a language module with masked-language modelling.

Everything a user can get wrong (pack, method, --set keys, corpus, base) is checked before an
MLflow run is opened, so a bad command leaves nothing behind in the tracking store.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from xlpeft import tracking
from xlpeft.config import DEFAULT_BASE, DEFAULT_METHOD
from xlpeft.data.batches import batches
from xlpeft.data.corpora import check_text_file, fingerprint_corpora
from xlpeft.data.mlm import attention_mask_for, mask_tokens, split_blocks
from xlpeft.data.stream import StreamBatches, check_streamable, corpus_mode
from xlpeft.data.token_store import open_store
from xlpeft.distributed import init_from_env
from xlpeft.errors import ConfigError
from xlpeft.io import Manifest, check_module_output
from xlpeft.packs import language_pack
from xlpeft.recipes import common
from xlpeft.recipes.common import base_ref, count_parameters, resolve_configs, resolve_epochs, run_tags, start_training
from xlpeft.registry import get_method
from xlpeft.tracking.lifecycle import config_defaults, publish, training_run
from xlpeft.tracking.registration import corpus_datasets
from xlpeft.training import PhaseRun, eval_block_count, evaluate_mlm, fit_train_config, mlm_loss, run_phases
from xlpeft.vocab import AppliedVocab, NewVocab, WithVocab, extended_tokenizer, plan_new_vocab, rows_for


@dataclass(frozen=True)
class LangRequest:
    """What the user asked for on the command line."""

    lang: str
    method: str = DEFAULT_METHOD
    base: str = DEFAULT_BASE
    corpus: tuple[str, ...] = ()
    sets: dict[str, str] = field(default_factory=dict)  # --set key=value (the CLI's --max-steps etc. included)
    output: str | None = None
    resume: bool = False
    overwrite: bool = False  # replace an xlpeft module of another kind at --output

    @property
    def registered_name(self) -> str:
        """The registry name the module will get (``xlpeft run`` looks it up before planning a step)."""
        return tracking.registered_name("language", self.lang, self.method)


@dataclass
class LangResult:
    path: Path
    run_id: str
    registered_name: str
    version: str
    metrics: dict[str, float]
    resumed_from: int | None = None


@dataclass
class LangPlan:
    """Everything ``train-lang`` resolves before a run opens: the tags and params the run will log, and their inputs."""

    spec: Any
    method_cfg: Any
    cfg: Any
    corpora: list
    out_dir: Path
    base: Any
    device: torch.device
    dist: Any
    train_blocks: Any  # Blocks views, or None when streamed
    eval_blocks: Any
    registered_name: str
    tags: dict[str, str]
    params: dict[str, Any]
    n_eval: int  # held-out blocks one evaluation reads
    before_key: dict[str, Any]  # what the loss before training depends on (its cache key)
    mode: str  # "cache" (train_blocks / eval_blocks are views of the token store) or "stream" (both None)
    tokenizer: Any  # the base's, or with the new vocabulary's words (--set new_tokens=N)
    vocab: NewVocab | None

    @property
    def param_defaults(self) -> dict[str, str]:
        """The logged settings' defaults: a run from before a setting existed is done while it is at its default."""
        return config_defaults(train=type(self.cfg), method=type(self.method_cfg))


def plan_language(req: LangRequest) -> LangPlan:
    """Check everything and resolve the run's tags and params, before an MLflow run exists.

    ``xlpeft run`` calls it too, to tell whether a finished run already logged this configuration.
    """
    pack = language_pack(req.lang)  # a pack, or any ISO 639 language trained on --corpus files
    spec = get_method(req.method)
    method_cfg, cfg = resolve_configs(req.method, "language", req.sets)
    corpora = pack.resolve(list(req.corpus))
    for c in corpora:
        if c.path:
            check_text_file(Path(c.path))
    out_dir = check_module_output(req.output or f"modules/lang-{req.lang}-{req.method}", "language", req.overwrite)
    base, device = start_training(req.base, cfg)
    cfg = fit_train_config(cfg, base, req.sets)  # max_seq_len within the base's position table
    spec.check(base, method_cfg, cfg)  # what the method checks against this base, before any run opens
    dist = init_from_env(device)
    mode = corpus_mode(cfg, corpora)
    idle = [k for k in ("new_token_unit", "new_token_min_count") if k in req.sets and not cfg.new_tokens]
    if idle:
        raise ConfigError(f"--set {idle[0]}={req.sets[idle[0]]} shapes the new tokens of --set new_tokens=N, which is "
                          "0 (none): add --set new_tokens=N, or drop it")
    vocab = plan_new_vocab(corpora, base.tokenizer, cfg.new_tokens, cfg.new_token_min_count,
                           cfg.new_token_unit)  # None: the base's
    tokenizer = base.tokenizer if vocab is None else extended_tokenizer(base.tokenizer, vocab)
    if mode == "cache":
        store = open_store(corpora, tokenizer, cfg.max_corpus_lines, progress=dist.main)  # tokenised once, cached
        blocks = store.blocks(cfg.max_seq_len, tokenizer)  # pack_blocks's blocks, read from disk on demand
        train_blocks, eval_blocks = split_blocks(blocks, cfg.eval_fraction, cfg.seed)
        method_cfg = resolve_epochs(req.method, method_cfg, cfg, len(train_blocks))  # epoch-based phases -> steps
        n_eval, data_key, counts = eval_block_count(cfg, len(eval_blocks)), store.meta["key"], (
            len(train_blocks), len(eval_blocks))
    else:  # streamed in train_language: nothing is read before the run opens
        check_streamable(method_cfg, cfg)
        train_blocks = eval_blocks = None
        n_eval, data_key, counts = eval_block_count(cfg, 10**12), f"stream:{fingerprint_corpora(corpora)}", (
            "stream", "stream")
    name = req.registered_name
    tags = run_tags("language", req.lang, pack.name, None, req.method, base)
    params = {
        "method": asdict(method_cfg), "train": asdict(cfg), "lang": req.lang, "base": base.name,
        "corpora": ", ".join(c.describe() for c in corpora),
        "corpus_fingerprint": fingerprint_corpora(corpora), "train_blocks": counts[0],
        "eval_blocks": counts[1], "eval_blocks_used": n_eval, "world_size": dist.world,
        **({"new_vocab": len(vocab.tokens)} if vocab else {}),
    }
    before_key = {"base": base.fingerprint, "tokens": data_key, "train": asdict(cfg), "n_eval": n_eval,
                  "method": req.method, "method_cfg": asdict(method_cfg), "device": device.type,
                  **({"new_vocab": vocab.to_extra()} if vocab else {})}
    return LangPlan(spec, method_cfg, cfg, corpora, out_dir, base, device, dist, train_blocks, eval_blocks, name,
                    tags, params, n_eval, before_key, mode, tokenizer, vocab)


def train_language(req: LangRequest) -> LangResult:
    """Train, save, log and register a language module; returns where it went."""
    p = plan_language(req)  # ---- setup: validate everything before an MLflow run exists
    spec, method_cfg, cfg, corpora, out_dir, base, device, dist = (p.spec, p.method_cfg, p.cfg, p.corpora, p.out_dir,
                                                                   p.base, p.device, p.dist)
    train_blocks, eval_blocks, name, tags, params = p.train_blocks, p.eval_blocks, p.registered_name, p.tags, p.params

    # ---- train
    with training_run(f"lang-{req.lang}-{req.method}", tags, params, dist, req.resume, out_dir) as (
        tracker, ckpt_dir, checkpoint,
    ):
        tracker.log_inputs(corpus_datasets(corpora, check_text_file))  # the UI's Dataset column (train)
        torch.manual_seed(cfg.seed)
        trainable = spec.prepare(base, method_cfg, cfg)
        if p.vocab is not None:  # new rows, initialised from the pieces they replace, trained beside the module
            rows = rows_for(base.model, p.vocab).to(device)
            rows.init_from_pieces(base.model, base.tokenizer)
            trainable = WithVocab(trainable, rows, AppliedVocab(base.model, rows))
        tokenizer = p.tokenizer
        mask_gen = torch.Generator().manual_seed(cfg.seed)
        if p.mode == "stream":  # tokenised ahead of the loop in a thread; held-out blocks from the stream's start
            data = StreamBatches(corpora, tokenizer, cfg.max_seq_len, cfg.batch_size,
                                 torch.Generator().manual_seed(cfg.seed), p.n_eval, cfg.stream_buffer, dist)
            eval_blocks = data.eval_blocks
        else:
            data = batches(train_blocks, cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
        dist.seed_dropout(cfg.seed)  # after the module is initialised identically on every rank

        def loss_fn(batch: torch.Tensor) -> torch.Tensor:
            inputs, labels = mask_tokens(batch, tokenizer, cfg.mlm_probability, mask_gen)  # same on every rank
            mask = attention_mask_for(batch, tokenizer.pad_token_id)  # from the uncorrupted batch
            n_global = int((labels != -100).sum())  # the whole global batch's count, identical on every rank
            return mlm_loss(base, dist.shard(inputs).to(device), dist.shard(labels).to(device),
                            dist.shard(mask).to(device), num_labelled=max(n_global, 1))

        def evaluate() -> dict[str, float]:
            return evaluate_mlm(base, eval_blocks, tokenizer, cfg, limit=p.n_eval)

        if checkpoint is None:
            before = common.cached_before(p.before_key, evaluate)
            tracker.log_metrics({f"{k}_before": v for k, v in before.items()}, 0)
        else:
            before = checkpoint[1]["summary"]["_before"]
        base.model.train()
        run = PhaseRun(trainable, {}, data, {"mask": mask_gen}, loss_fn, evaluate, cfg, tracker,
                       req.lang, ckpt_dir if dist.main else None, dist, model=base.model)
        try:
            done, summary = run_phases(run, checkpoint, state={"_before": before})
            base.model.eval()
            after = evaluate()
            tracker.log_metrics(after, done)
            tensors, extra = trainable.export()
        finally:
            trainable.close()  # the in-memory base is restored exactly whatever happened
            data.close()  # a stream's reader thread
        # ---- save, verify, log, register (rank 0 only)
        manifest = Manifest(
            kind="language", method=req.method, lang=req.lang, base=base_ref(base), config=asdict(method_cfg),
            trainable_parameters=count_parameters(tensors, extra),
            training={"steps": done, "phases": summary, "seed": cfg.seed, "train": asdict(cfg),
                      "world_size": dist.world, "corpora": [c.describe() for c in corpora],
                      "eval_loss_before": before["eval_loss"], **after},
            extra=extra,
        )
        version = publish(tracker, dist, out_dir, manifest, tensors, name, tags, done, ckpt_dir, spec.parents(extra))
    dist.close()
    return LangResult(out_dir, tracker.run_id, name, version, after,
                      checkpoint[1]["done"] if checkpoint else None)

