"""Make the composable-sft interop fixtures (run in the composable-sft venv, see README.md).

    tools/make_interop_fixtures/.venv-composable-sft/bin/python tools/make_interop_fixtures/composable_sft_fixtures.py tests/interop/fixtures

Each SFT imitates what composable-sft's trainer saves: a sparse difference for every maskable
parameter of the encoder (LayerNorms frozen, as with ``--freeze_layer_norm``; some parameters
untouched, stored with no entries), and the head's trained values dense. With composable-sft
installed (``setup_composable_sft.sh``) the SFTs are its own ``sft.SFT`` objects: ``add_param``,
``save`` (the current ``{diffs, abs}`` layout) and ``apply`` for the expected logits are its code.
The earlier ``{body, head}`` layout, which current composable-sft no longer writes, is written from
the same object's COO diffs by :func:`save_body`. Without composable-sft (any venv with
transformers) :mod:`composable_sft_ref`'s reimplementation stands in for all of it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers
from composable_sft_ref import FILE, ReferenceSFT
from safetensors.torch import save_file
from tiny_bases import build_base, input_batch
from transformers import AutoModelForMaskedLM, AutoModelForTokenClassification

try:  # composable-sft's own code, installed from its source
    from sft import SFT as HomeSFT
except ImportError:
    HomeSFT = None

UNTOUCHED = ("embeddings.token_type_embeddings.weight", "embeddings.position_embeddings.weight")
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def maskable(model) -> dict[str, torch.nn.Parameter]:
    prefix = model.base_model_prefix + "."
    return {n: p for n, p in model.named_parameters() if n.startswith(prefix) and "LayerNorm" not in n}


def save_body(sft, directory: Path) -> None:
    """The earlier layout, ``{"body": {name: coalesced sparse COO}, "head": {name: dense}}``, from an SFT's diffs."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"body": dict(sft.diffs), **({"head": dict(sft.abs)} if sft.abs else {})}
    torch.save(payload, directory / FILE)


def save(sft, directory: Path, layout: str = "diffs") -> None:
    if layout == "body":
        save_body(sft, directory)
    elif HomeSFT is not None:
        directory.mkdir(parents=True, exist_ok=True)
        sft.save(str(directory))  # composable-sft's SFT.save
    else:
        sft.save(str(directory), layout=layout)


def make_sft(model, head: tuple[str, ...], k: int, seed: int):
    """``k`` random entries of the maskable parameters get N(0, 0.3^2) differences; ``head`` params get new values."""
    gen = torch.Generator().manual_seed(seed)
    params = maskable(model)
    sizes = {n: (0 if n.endswith(UNTOUCHED) else p.numel()) for n, p in params.items()}
    total = sum(sizes.values())
    chosen = torch.randperm(total, generator=gen)[:k]
    sft, start = (HomeSFT() if HomeSFT is not None else ReferenceSFT()), 0
    for name, p in params.items():
        mine = chosen[(chosen >= start) & (chosen < start + sizes[name])] - start
        start += sizes[name]
        delta = torch.zeros(p.numel())
        delta[mine] = 0.3 * torch.randn(len(mine), generator=gen)
        sft.add_param(name, delta.view_as(p), diff=True)  # every maskable parameter, as the trainer does
    for name in head:
        p = model.get_parameter(name)
        sft.add_param(name, p.detach() + 0.2 * torch.randn(p.shape, generator=gen), diff=False)
    return sft


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    return model.eval()(**batch).logits.detach().clone()


def main(out: Path) -> None:
    transformers.logging.set_verbosity_error()
    root = out / "composable_sft"
    bases = {kind: out / "bases" / kind for kind in ("tiny-bert", "tiny-xlmr")}
    for kind, path in bases.items():
        if not (path / "config.json").is_file():
            build_base(kind, path)

    mlm_heads = {"tiny-bert": ("cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
                               "cls.predictions.bias"),
                 "tiny-xlmr": ("lm_head.dense.weight", "lm_head.dense.bias", "lm_head.bias")}
    for kind, case, seed in (("tiny-bert", "lang_bert", 11), ("tiny-xlmr", "lang_xlmr", 12)):
        batch = input_batch(kind)
        sft = make_sft(AutoModelForMaskedLM.from_pretrained(bases[kind]), mlm_heads[kind], k=2000, seed=seed)
        layouts = ("diffs", "body") if kind == "tiny-bert" else ("diffs",)
        model = AutoModelForMaskedLM.from_pretrained(bases[kind])
        bare = logits(model, batch)
        sft.apply(model)
        expected = logits(model, batch)
        for layout in layouts:
            target = root / f"{case}_{layout}"
            save(sft, target, layout)
            save_file({**batch, "logits": expected, "base_logits": bare}, str(target / "expected.safetensors"))

    # a task SFT with a token-classification head, alone and over the BERT language SFT (with_abs=False)
    batch = input_batch("tiny-bert")
    task_model = AutoModelForTokenClassification.from_pretrained(bases["tiny-bert"], num_labels=len(NER_LABELS))
    task = make_sft(task_model, ("classifier.weight", "classifier.bias"), k=1500, seed=13)
    target = root / "ner_bert_diffs"
    save(task, target)
    task_model.config.id2label = dict(enumerate(NER_LABELS))
    task_model.config.label2id = {label: i for i, label in enumerate(NER_LABELS)}
    task_model.config.architectures = ["BertForTokenClassification"]
    task_model.config.to_json_file(str(target / "config.json"))  # label names, as a task SFT release carries them
    alone = AutoModelForTokenClassification.from_pretrained(bases["tiny-bert"], num_labels=len(NER_LABELS))
    task.apply(alone)
    stacked = AutoModelForTokenClassification.from_pretrained(bases["tiny-bert"], num_labels=len(NER_LABELS))
    lang = make_sft(AutoModelForMaskedLM.from_pretrained(bases["tiny-bert"]), mlm_heads["tiny-bert"], k=2000, seed=11)
    lang.apply(stacked, with_abs=False)  # the lang_bert SFT again (same seed); composable-sft's SFT(dir) needs
    # torch.load(weights_only=False) for its own files on torch >= 2.6 (a numpy scalar in index_steps)
    task.apply(stacked)
    save_file({**batch, "logits": logits(alone, batch), "stack_lang_bert_logits": logits(stacked, batch)},
              str(target / "expected.safetensors"))
    print(f"composable-sft fixtures written under {root} with transformers {transformers.__version__}, "
          f"torch {torch.__version__}, by {'composable-sft' if HomeSFT is not None else 'the reimplementation'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/interop/fixtures"))
