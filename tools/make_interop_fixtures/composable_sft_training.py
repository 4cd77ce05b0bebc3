"""Run composable-sft's own LT-SFT training (both phases) on the tiny BERT and record what it selected and learnt.

Runs in the composable-sft venv (``setup_composable_sft.sh``), not in xlpeft's:

    tools/make_interop_fixtures/.venv-composable-sft/bin/python \
        tools/make_interop_fixtures/composable_sft_training.py tests/interop/fixtures

Writes ``<fixtures>/composable_sft_training/`` (read by ``tests/interop/test_composable_sft_training.py``):

* ``batches.safetensors``: the fixed training data of both cases (token ids, MLM labels, task labels);
* ``initial.safetensors``: the task head composable-sft starts from (``classifier.*``, HF's init);
* ``<case>.safetensors``: per maskable parameter, ``mask.<name>`` (row-major flat indices where the
  trainer's ``_mask`` is set) and ``delta.<name>`` (final - original weights at those indices), and
  for the task case the final head ``head.classifier.*``;
* ``<case>/pytorch_diff.bin``: the trainer's own ``sft().save()`` output;
* ``meta.json``: every setting, the library versions, the margin at the selection threshold, and how much
  composable-sft's L1 (as released) changed its result (``max_abs_change_from_l1``: 0.0, see
  :func:`detach_originals`).

What is composable-sft's and what is this script's: the trainer classes (``LotteryTicketSparseFineTuner``
over ``transformers.Trainer``: both phases, threshold selection, reset, gradient masking, L1, the HF
AdamW/linear schedule/clipping/accumulation) run unmodified. This script does what composable-sft's
``examples/*/run_*.py`` do before building the trainer (untie/freeze the decoder, freeze LayerNorms, list
the maskable parameters ``bert.*`` that require grad), with two choices for a deterministic comparison:
the batches are fixed tensors read in order (a ``Trainer`` subclass whose sampler is sequential, passed to
composable-sft's class factory like ``Trainer`` itself), and dropout is 0. Case ``lang_mlm_l1`` alone
changes one thing in the trainer instance, see :func:`detach_originals`.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import sft
import torch
import transformers
from safetensors.torch import load_file, save_file
from sft import LotteryTicketSparseFineTuner, SftArguments
from torch.utils.data import SequentialSampler
from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForTokenClassification, Trainer, TrainingArguments

SEED = 1234
SEQ, N = 16, 16  # tokens per sequence, sequences per case
MASKED_PER_SEQ = 3  # the same count in every sequence: mean-of-micro-batch-means == global mean
NUM_LABELS = 5
CASES = {
    # language SFT: composable-sft's MLM recipe (L1 0.1 in both phases, --freeze_decoder --freeze_layer_norm),
    # with the MLM head frozen as xlpeft keeps it (--freeze_head); gradient accumulation 2 as train_mlm.sh
    "lang_mlm": {"k": 2000, "lr": 5e-4, "batch_size": 4, "grad_accum": 2, "full_steps": 6, "sparse_steps": 6,
                 "full_l1": 0.1, "sparse_l1": 0.1, "freeze_head": True},
    # the same with composable-sft's L1 made effective (see detach_originals): what its L1 was meant to compute
    "lang_mlm_l1": {"k": 2000, "lr": 5e-4, "batch_size": 4, "grad_accum": 2, "full_steps": 6, "sparse_steps": 6,
                    "full_l1": 0.1, "sparse_l1": 0.1, "freeze_head": True, "detach_originals": True},
    # task SFT: the NER/POS recipe (epochs 3 + 10, no L1, --freeze_layer_norm), token classification head
    "task_tokcls": {"k": 2000, "lr": 5e-4, "batch_size": 4, "grad_accum": 1, "full_epochs": 3, "sparse_epochs": 10,
                    "full_l1": 0.0, "sparse_l1": 0.0},
}


class FixedOrderTrainer(Trainer):
    """``transformers.Trainer`` reading the training set in order, so both libraries see the same batches."""

    def _get_train_sampler(self):
        return SequentialSampler(self.train_dataset)


def detach_originals(trainer) -> None:
    """The one change made to composable-sft's behaviour, for the ``lang_mlm_l1`` case only.

    ``SparseFineTuner.__init__`` builds ``_original_params`` as ``torch.zeros_like(p).copy_(p)`` outside
    ``torch.no_grad()``, so each copy keeps an autograd edge to its live parameter and the gradient of
    ``|p - original|`` is ``sign - sign = 0``: the L1 term is computed and logged but moves nothing (the
    ``lang_mlm`` case, L1 0.1, equals a run without L1 bit for bit; ``meta.json`` records it). Detaching the
    copies (same values) makes the L1 term act as written.
    """
    trainer._original_params = {n: t.detach() for n, t in trainer._original_params.items()}


def recording(trainer_cls, margins: list):
    """composable-sft's trainer class, recording the scores around the selection threshold (behaviour unchanged)."""

    class Recording(trainer_cls):
        def unfreeze_k_most_changed_params(self, k):
            with torch.no_grad():
                scores = torch.cat([(p - self._original_params[n]).abs().reshape(-1)
                                    for n, p in self.model.named_parameters() if n in self.maskable_params])
            top = torch.topk(scores, k + 1).values
            margins.append({"kth": float(top[k - 1]), "next": float(top[k]),
                            "within_1e-8_of_kth": int(((scores - top[k - 1]).abs() <= 1e-8).sum())})
            return super().unfreeze_k_most_changed_params(k)

    return Recording


class Rows(torch.utils.data.Dataset):
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def stack(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def make_batches(vocab: int, mask_id: int) -> dict[str, torch.Tensor]:
    """Token ids without special tokens (no padding: attention masks are all ones); fixed masked positions."""
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(5, vocab, (N, SEQ), generator=g)
    positions = torch.stack([torch.randperm(SEQ, generator=g)[:MASKED_PER_SEQ] for _ in range(N)])  # (N, 3)
    masked = torch.zeros(N, SEQ, dtype=torch.bool).scatter_(1, positions, True)
    mlm_inputs = torch.where(masked, torch.full_like(ids, mask_id), ids)
    mlm_labels = torch.where(masked, ids, torch.full_like(ids, -100))
    task_ids = torch.randint(5, vocab, (N, SEQ), generator=g)
    task_labels = torch.randint(0, NUM_LABELS, (N, SEQ), generator=g)
    task_labels[:, 0] = -100  # one unlabelled position per sequence, as a first sub-token scheme leaves
    return {"lang_input_ids": mlm_inputs, "lang_labels": mlm_labels,
            "task_input_ids": task_ids, "task_labels": task_labels}


def freeze_like_run_scripts(model, prefix: str, freeze_head: bool) -> list[str]:
    """What examples/language-modeling/run_mlm.py (``--freeze_decoder``/``--freeze_head``) and the
    token-classification script (``--freeze_layer_norm``) do to the model; returns the maskable names."""
    if hasattr(model, "cls"):  # MLM: untie the decoder, freeze it (and the head with --freeze_head)
        embeddings = model.base_model.embeddings.word_embeddings.weight
        decoder = model.cls.predictions.decoder
        decoder.weight = torch.nn.Parameter(torch.zeros_like(embeddings).copy_(embeddings))
        decoder.weight.requires_grad = False
        if freeze_head:
            for p in model.cls.parameters():
                p.requires_grad = False
    for n, p in model.named_parameters():
        if "LayerNorm" in n:
            p.requires_grad = False
    return [n for n, p in model.named_parameters() if n.startswith(prefix) and p.requires_grad]


def train_case(name: str, case: dict, base: Path, data: dict[str, torch.Tensor], out: Path, meta: dict) -> dict:
    config = AutoConfig.from_pretrained(base, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                        num_labels=NUM_LABELS)
    torch.manual_seed(SEED)  # the task head's initial weights
    if name.startswith("lang"):
        model = AutoModelForMaskedLM.from_pretrained(base, config=config)
        rows = {"input_ids": data["lang_input_ids"], "labels": data["lang_labels"]}
    else:
        model = AutoModelForTokenClassification.from_pretrained(base, config=config)
        rows = {"input_ids": data["task_input_ids"], "labels": data["task_labels"]}
    rows["attention_mask"] = torch.ones_like(rows["input_ids"])
    initial_head = {f"classifier.{k}": v.detach().clone() for k, v in getattr(model, "classifier", torch.nn.Module()).state_dict().items()}
    maskable = freeze_like_run_scripts(model, model.base_model_prefix, case.get("freeze_head", False))
    sft_args = SftArguments(
        ft_params_num=case["k"], freeze_layer_norm=True, full_l1_reg=case["full_l1"], sparse_l1_reg=case["sparse_l1"],
        full_ft_max_steps_per_iteration=case.get("full_steps"), sparse_ft_max_steps_per_iteration=case.get("sparse_steps"),
        full_ft_max_epochs_per_iteration=case.get("full_epochs"), sparse_ft_max_epochs_per_iteration=case.get("sparse_epochs"),
    )
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=case["batch_size"], gradient_accumulation_steps=case["grad_accum"],
            learning_rate=case["lr"], save_strategy="no", logging_steps=10_000, report_to=[], disable_tqdm=True,
            seed=SEED, use_cpu=True, dataloader_num_workers=0,
        )
        margins: list = []
        trainer = recording(LotteryTicketSparseFineTuner(FixedOrderTrainer), margins)(
            model=model, args=args, train_dataset=Rows(rows), data_collator=stack, sft_args=sft_args,
            maskable_params=maskable,
        )
        if case.get("detach_originals"):
            detach_originals(trainer)
        trainer.train()
        diff = trainer.sft()
        (out / name).mkdir(parents=True, exist_ok=True)
        diff.save(str(out / name))
    tensors = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in maskable:
                idx = torch.nonzero(trainer._mask[n].reshape(-1)).reshape(-1)
                tensors[f"mask.{n}"] = idx
                tensors[f"delta.{n}"] = (p - trainer._original_params[n]).reshape(-1)[idx].contiguous()
        if initial_head:
            tensors.update({f"head.classifier.{k}": v.detach().clone() for k, v in model.classifier.state_dict().items()})
    meta[name] = {**case, "maskable": maskable, "selected": int(sum(len(v) for k, v in tensors.items() if k.startswith("mask."))),
                  "global_steps": int(trainer.state.global_step), "selection_margin": margins}
    save_file(tensors, str(out / f"{name}.safetensors"))
    return initial_head


def main(root: str) -> None:
    out = Path(root) / "composable_sft_training"
    out.mkdir(parents=True, exist_ok=True)
    base = Path(root) / "bases" / "tiny-bert"
    vocab = AutoConfig.from_pretrained(base).vocab_size
    data = make_batches(vocab, mask_id=4)  # tiny-bert's [MASK]
    save_file(data, str(out / "batches.safetensors"))
    meta: dict = {"seed": SEED, "seq_len": SEQ, "sequences": N, "masked_per_sequence": MASKED_PER_SEQ,
                  "num_labels": NUM_LABELS, "transformers": transformers.__version__, "torch": torch.__version__,
                  "composable_sft": getattr(sft, "__file__", "?"), "composable_sft_commit": "29f7872"}
    initial = {}
    for name, case in CASES.items():
        initial.update(train_case(name, case, base, data, out, meta))
    with tempfile.TemporaryDirectory() as tmp:  # composable-sft's L1 as released: does it change anything?
        train_case("lang_mlm", {**CASES["lang_mlm"], "full_l1": 0.0, "sparse_l1": 0.0}, base, data, Path(tmp), {})
        without = load_file(str(Path(tmp) / "lang_mlm.safetensors"))
    released = load_file(str(out / "lang_mlm.safetensors"))
    meta["lang_mlm"]["max_abs_change_from_l1"] = max(
        float((released[k].double() - without[k].double()).abs().max()) if released[k].shape == without[k].shape else float("inf")
        for k in released if released[k].numel())
    save_file(initial, str(out / "initial.safetensors"))
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: {"selected": v["selected"], "global_steps": v["global_steps"]} for k, v in meta.items()
                      if isinstance(v, dict)}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/interop/fixtures")
