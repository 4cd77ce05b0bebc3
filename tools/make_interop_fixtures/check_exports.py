"""Load xlpeft's exports with the home libraries and compare logits with the fixtures (foreign venv, see README.md).

    benchmarks/.venv-adapterhub/bin/python tools/make_interop_fixtures/check_exports.py tests/interop/fixtures /tmp/xlpeft-exports

AdapterHub exports go through ``load_adapter`` (``use_safetensors`` for the safetensors one) on
the same flexible-head models that made the fixtures; composable-sft exports are first read with
``torch.load(weights_only=True)`` (what composable-sft's plain ``torch.load`` does on torch >= 2.6)
and then applied by the reference reimplementation. Prints the max abs difference per case and
exits 1 if any exceeds 1e-4.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers
from adapterhub_fixtures import flex_model
from adapters.composition import Stack
from composable_sft_ref import FILE, ReferenceSFT
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoModelForTokenClassification

TOLERANCE = 1e-4
BASES = {"xlmr_seq_bn_inv": "tiny-xlmr", "nli_double_seq_bn": "tiny-xlmr", "lang_xlmr": "tiny-xlmr"}


@torch.no_grad()
def logits(model, expected) -> torch.Tensor:
    return model.eval()(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).logits


def check_adapterhub(fixtures: Path, exports: Path) -> dict[str, float]:
    results = {}
    for export in sorted(p for p in (exports / "adapterhub").iterdir() if p.is_dir()):
        case = export.name.removesuffix("_safetensors")
        kind = BASES.get(case, "tiny-bert")
        expected = load_file(str(fixtures / "adapterhub" / case / "expected.safetensors"))
        model = flex_model(kind, fixtures / "bases" / kind)
        name = model.load_adapter(str(export), with_head=True, set_active=True,
                                  use_safetensors=export.name.endswith("_safetensors"))
        if name in model.heads:
            model.active_head = name
        results[f"adapterhub/{export.name}"] = float((logits(model, expected) - expected["logits"]).abs().max())
        if case == "ner_seq_bn":
            for lang in ("seq_bn", "seq_bn_inv"):
                lang_name = model.load_adapter(str(exports / "adapterhub" / lang), load_as=f"sw_{lang}")
                model.active_adapters = Stack(lang_name, name)
                model.active_head = name
                diff = (logits(model, expected) - expected[f"stack_{lang}_logits"]).abs().max()
                results[f"adapterhub/{export.name}+stack_{lang}"] = float(diff)
    return results


def check_composable_sft(fixtures: Path, exports: Path) -> dict[str, float]:
    results = {}
    for export in sorted(p for p in (exports / "composable_sft").iterdir() if p.is_dir()):
        torch.load(export / FILE, weights_only=True)  # plain tensors, numbers and containers only
        stem = export.name.rsplit("_", 1)[0]
        kind = BASES.get(stem, "tiny-bert")
        expected = load_file(str(fixtures / "composable_sft" / f"{stem}_diffs" / "expected.safetensors"))
        base = fixtures / "bases" / kind
        sft = ReferenceSFT.load(str(export))
        if stem == "ner_bert":
            model = AutoModelForTokenClassification.from_pretrained(base, num_labels=5)
            stacked = AutoModelForTokenClassification.from_pretrained(base, num_labels=5)
            ReferenceSFT.load(str(exports / "composable_sft" / "lang_bert_diffs")).apply(stacked, with_abs=False)
            sft.apply(stacked)
            diff = (logits(stacked, expected) - expected["stack_lang_bert_logits"]).abs().max()
            results[f"composable_sft/{export.name}+stack_lang_bert"] = float(diff)
        else:
            model = AutoModelForMaskedLM.from_pretrained(base)
        sft.apply(model)
        results[f"composable_sft/{export.name}"] = float((logits(model, expected) - expected["logits"]).abs().max())
    return results


def main(fixtures: Path, exports: Path) -> int:
    transformers.logging.set_verbosity_error()
    results = {**check_adapterhub(fixtures, exports), **check_composable_sft(fixtures, exports)}
    for case, diff in results.items():
        print(f"{case:55s} max |logits - expected| = {diff:.3g}")
    failed = [c for c, d in results.items() if not d <= TOLERANCE]
    print(f"{len(results) - len(failed)}/{len(results)} exports reproduce the home library's logits to {TOLERANCE}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
