"""Make the AdapterHub interop fixtures with the `adapters` library itself (run in its own venv, see README.md).

    benchmarks/.venv-adapterhub/bin/python tools/make_interop_fixtures/adapterhub_fixtures.py tests/interop/fixtures [CASE ...]
    benchmarks/.venv-adapterhub/bin/python tools/make_interop_fixtures/adapterhub_fixtures.py --check-exports FIXTURES EXPORTS

For each case an adapter is added to a flexible-head model (``BertAdapterModel`` /
``XLMRobertaAdapterModel``) built on a tiny base, its weights are drawn at random from a fixed
seed, the logits for fixed input ids are recorded, and the adapter is written with
``save_adapter`` exactly as AdapterHub writes it. MLM logits come from the flexible masked-LM head
converted from the base checkpoint's own MLM head: that head applies the invertible adapter's
inverse before the decoder (MAD-X), which a plain ``BertForMaskedLM`` + ``adapters.init`` does not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import adapters
import torch
import transformers
from adapters import (
    BertAdapterModel,
    CompacterConfig,
    CompacterPlusPlusConfig,
    DoRAConfig,
    DoubleSeqBnConfig,
    DoubleSeqBnInvConfig,
    IA3Config,
    LoRAConfig,
    MAMConfig,
    ParBnConfig,
    PrefixTuningConfig,
    SeqBnConfig,
    SeqBnInvConfig,
    XLMRobertaAdapterModel,
)
from adapters.composition import Stack
from safetensors.torch import save_file
from tiny_bases import build_base, build_model, input_batch

FLEX = {"tiny-bert": BertAdapterModel, "tiny-xlmr": XLMRobertaAdapterModel}

# name: (base, adapter name, config, head, weights as safetensors?)
MLM_CASES = {
    "seq_bn": ("tiny-bert", "sw", SeqBnConfig(reduction_factor=4), False),
    "seq_bn_inv": ("tiny-bert", "sw", SeqBnInvConfig(reduction_factor=4), False),
    "double_seq_bn": ("tiny-bert", "sw", DoubleSeqBnConfig(reduction_factor=4), True),
    "double_seq_bn_inv": ("tiny-bert", "sw", DoubleSeqBnInvConfig(reduction_factor=4), False),
    # options xlpeft expresses exactly: per-layer leave_out (identity), constant scaling (folded), gelu
    "seq_bn_options": ("tiny-bert", "yo", SeqBnConfig(reduction_factor=8, non_linearity="gelu", scaling=2.0,
                                                      leave_out=[0]), False),
    "xlmr_seq_bn_inv": ("tiny-xlmr", "sw", SeqBnInvConfig(reduction_factor=4, inv_adapter_reduction_factor=4), False),
}

# The other methods (issue 18). Weights are redrawn per tensor (see `redraw`); each case also records the logits
# of the padded second sequence run alone without its padding (`row1_unpadded_logits`), which prefix masks must match.
# Sizes: the prefix MLP is 64 wide (AdapterHub's default 512, and MAM's 800, would add 0.3 / 0.5 MB each: the same
# code path, wider matrices), Compacter's reduction factor is 4 (its default 32 leaves a bottleneck of 1 on hidden
# size 32, which AdapterHub's PHM layer refuses: it must divide by phm_dim 4).
METHOD_CASES = {
    "lora": ("tiny-bert", "sw", LoRAConfig()),
    "lora_targets": ("tiny-bert", "sw", LoRAConfig(r=4, alpha=8, attn_matrices=["q", "k", "v"], intermediate_lora=True,
                                                    output_lora=True)),
    "lora_dora": ("tiny-bert", "sw", DoRAConfig(r=4, alpha=8)),
    "xlmr_lora": ("tiny-xlmr", "sw", LoRAConfig(r=8, alpha=16)),
    "ia3": ("tiny-bert", "sw", IA3Config()),
    "prefix_tuning": ("tiny-bert", "sw", PrefixTuningConfig(bottleneck_size=64)),
    "prefix_tuning_flat": ("tiny-bert", "sw", PrefixTuningConfig(flat=True)),
    "xlmr_prefix_tuning": ("tiny-xlmr", "sw", PrefixTuningConfig(prefix_length=8, bottleneck_size=32)),
    "compacter": ("tiny-bert", "sw", CompacterConfig(reduction_factor=4)),
    "compacter++": ("tiny-bert", "sw", CompacterPlusPlusConfig(reduction_factor=4)),
    "par_bn": ("tiny-bert", "sw", ParBnConfig()),
    "mam": ("tiny-bert", "sw", MAMConfig(PrefixTuningConfig(bottleneck_size=64), ParBnConfig())),
    # options the converters map rather than copy: alpha folded into (IA)^3 vectors, leave_out, scaling folded into
    # the PHM up-projection, rank-2 fast weights and per-layer rules, a parallel adapter beside attention and FFN
    "ia3_attn": ("tiny-bert", "sw", IA3Config(intermediate_lora=False, alpha=2)),
    "lora_leave_out": ("tiny-bert", "sw", LoRAConfig(r=4, alpha=16, dropout=0.1, leave_out=[0])),
    "compacter_options": ("tiny-bert", "sw", CompacterPlusPlusConfig(reduction_factor=4, scaling=0.5, leave_out=[1],
                                                                     phm_rank=2, shared_phm_rule=False)),
    "par_bn_options": ("tiny-bert", "sw", ParBnConfig(mh_adapter=True, output_adapter=True, reduction_factor=4,
                                                      non_linearity="gelu", scaling=2.0)),
}


def redraw(pname: str, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Non-trivial values for one adapter tensor: std 0.2 noise, around the tensor's meaning where zero would kill it.

    (IA)^3 vectors and DoRA magnitudes scale activations, so they get 1 + noise (times the magnitude); the PHM rule
    gets std 1, so that the Kronecker sums (rule x 0.2 x 0.2) still move the logits well above the tolerance.
    """
    noise = torch.randn(p.shape, generator=gen)
    if ".loras." in pname and pname.endswith("lora_B") and p.shape[-1] == 1:  # (IA)^3 scaling vector (out, 1)
        return 1.0 + 0.2 * noise
    if pname.endswith(".m.weight"):  # DoRA magnitude (out, 1), initialised to the column norms of W
        return p * (1.0 + 0.2 * noise)
    if pname.endswith("phm_rule"):
        return noise
    return 0.2 * noise


def randomise_method(model, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    marks = (f".adapters.{name}.", f".loras.{name}.", f"prefix_tunings.{name}.", f"shared_parameters.{name}.",
             f"heads.{name}.")
    with torch.no_grad():
        for pname, p in model.named_parameters():  # shared tensors (the prefix pool) come once
            if any(m in pname for m in marks):
                p.copy_(redraw(pname, p, gen))


def row1_unpadded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The second (padded) sequence alone, cut to its real tokens: a batch of 1 without padding."""
    real = int(batch["attention_mask"][1].sum())
    return {k: v[1:2, :real] for k, v in batch.items()}


def method_case(out: Path, bases: dict[str, Path], case: str, seed: int) -> None:
    kind, name, config = METHOD_CASES[case]
    batch = input_batch(kind)
    model = flex_model(kind, bases[kind])
    bare = logits(model, batch)
    model.add_adapter(name, config=config)
    randomise_method(model, name, seed)
    model.set_active_adapters(name)
    expected = logits(model, batch)
    assert (expected - bare).abs().max() > 0.1, f"{case}: the adapter barely changes the logits"
    alone = logits(model, row1_unpadded(batch))
    real = alone.shape[1]
    assert torch.allclose(alone[0], expected[1, :real], atol=1e-5), f"{case}: padding changes the real tokens' logits"
    target = out / "adapterhub" / case
    target.parent.mkdir(parents=True, exist_ok=True)
    model.save_adapter(str(target), name, with_head=False)
    save_file({**batch, "logits": expected, "row1_unpadded_logits": alone}, str(target / "expected.safetensors"))
    if case == "prefix_tuning":  # AdapterHub's own eject (run the MLP once, keep the flat prefix): what it then saves
        model.eject_prefix_tuning(name)
        ejected = logits(model, batch)
        assert torch.allclose(ejected, expected, atol=1e-6), "eject_prefix_tuning changed the logits"
        target = out / "adapterhub" / "prefix_tuning_ejected"
        model.save_adapter(str(target), name, with_head=False)
        save_file({**batch, "logits": ejected}, str(target / "expected.safetensors"))


def method_task_case(out: Path, bases: dict[str, Path]) -> None:
    """A LoRA task adapter with a tagging head, alone and stacked over a prefix and a parallel language adapter."""
    batch = input_batch("tiny-bert")
    model = flex_model("tiny-bert", bases["tiny-bert"])
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    model.add_tagging_head("ner", num_labels=len(labels), id2label=dict(enumerate(labels)))
    model.add_adapter("ner", config=LoRAConfig(r=4, alpha=8))
    randomise_method(model, "ner", 301)
    model.set_active_adapters("ner")
    model.active_head = "ner"
    expected = {"logits": logits(model, batch)}
    for lang in ("prefix_tuning", "par_bn"):
        loaded = model.load_adapter(str(out / "adapterhub" / lang), load_as=f"sw_{lang}")
        model.active_adapters = Stack(loaded, "ner")  # each layer applies the adapters of its own kind
        model.active_head = "ner"
        expected[f"stack_{lang}_logits"] = logits(model, batch)
        assert (expected[f"stack_{lang}_logits"] - expected["logits"]).abs().max() > 0.1
    model.set_active_adapters("ner")
    target = out / "adapterhub" / "ner_lora"
    model.save_adapter(str(target), "ner", with_head=True)
    save_file({**batch, **expected}, str(target / "expected.safetensors"))


def flex_model(kind: str, base_dir: Path):
    """The flexible-head model on ``base_dir`` whose ``default`` MLM head equals the base's own MLM head."""
    model = FLEX[kind].from_pretrained(base_dir).eval()
    reference = build_model(kind)  # the same weights, from the same seed
    head = model.heads["default"]
    with torch.no_grad():  # AdapterHub's static-to-flex conversion leaves the decoder bias out; copy it
        head[len(head) - 1].bias.copy_(reference.get_output_embeddings().bias)
    model.config.name_or_path = kind
    return model


def randomise(model, name: str, seed: int) -> None:
    """Draw every weight of adapter/head ``name`` from N(0, 0.2^2) (AdapterHub initialises them near zero)."""
    gen = torch.Generator().manual_seed(seed)
    marks = (f".adapters.{name}.", f"invertible_adapters.{name}.", f"heads.{name}.")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if any(m in pname for m in marks):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    return model(**batch).logits.detach().clone()


def mlm_case(out: Path, bases: dict[str, Path], case: str, seed: int) -> None:
    kind, name, config, safetensors = MLM_CASES[case]
    batch = input_batch(kind)
    model = flex_model(kind, bases[kind])
    bare = logits(model, batch)
    reference = logits(build_model(kind), batch)
    assert torch.allclose(bare, reference, atol=1e-5), f"{case}: flex MLM head differs from the base's"
    model.add_adapter(name, config=config)
    randomise(model, name, seed)
    model.set_active_adapters(name)
    expected = logits(model, batch)
    assert (expected - bare).abs().max() > 0.1, f"{case}: the adapter barely changes the logits"
    target = out / "adapterhub" / case
    target.parent.mkdir(parents=True, exist_ok=True)
    model.save_adapter(str(target), name, with_head=False, use_safetensors=safetensors)
    save_file({**batch, "logits": expected, "base_logits": bare}, str(target / "expected.safetensors"))


def task_cases(out: Path, bases: dict[str, Path]) -> None:
    # NER: a seq_bn task adapter with a one-layer tagging head, alone and stacked over language adapters (MAD-X)
    batch = input_batch("tiny-bert")
    model = flex_model("tiny-bert", bases["tiny-bert"])
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    model.add_tagging_head("ner", num_labels=len(labels), id2label=dict(enumerate(labels)))
    model.add_adapter("ner", config=SeqBnConfig(reduction_factor=4))
    randomise(model, "ner", 101)
    model.set_active_adapters("ner")
    model.active_head = "ner"
    target = out / "adapterhub" / "ner_seq_bn"
    expected = {"logits": logits(model, batch)}
    for lang in ("seq_bn", "seq_bn_inv"):
        loaded = model.load_adapter(str(out / "adapterhub" / lang), load_as=f"sw_{lang}")
        model.active_adapters = Stack(loaded, "ner")
        model.active_head = "ner"
        expected[f"stack_{lang}_logits"] = logits(model, batch)
    model.set_active_adapters("ner")
    model.save_adapter(str(target), "ner", with_head=True)
    save_file({**batch, **expected}, str(target / "expected.safetensors"))

    # NLI: a double_seq_bn task adapter with a two-layer classification head on XLM-R
    batch = input_batch("tiny-xlmr")
    model = flex_model("tiny-xlmr", bases["tiny-xlmr"])
    labels = ["entailment", "neutral", "contradiction"]
    model.add_classification_head("nli", num_labels=3, id2label=dict(enumerate(labels)))
    model.add_adapter("nli", config=DoubleSeqBnConfig(reduction_factor=4))
    randomise(model, "nli", 102)
    model.set_active_adapters("nli")
    model.active_head = "nli"
    target = out / "adapterhub" / "nli_double_seq_bn"
    model.save_adapter(str(target), "nli", with_head=True)
    save_file({**batch, "logits": logits(model, batch)}, str(target / "expected.safetensors"))


def main(out: Path, only: list[str]) -> None:
    """Write every case, or only the METHOD_CASES named in ``only`` (re-running the others changes their
    expected logits in the last float bits, ~2e-6, with the CPU's thread scheduling)."""
    transformers.logging.set_verbosity_error()
    bases = {kind: build_base(kind, out / "bases" / kind) for kind in FLEX}
    if only:
        for seed, case in enumerate(METHOD_CASES, start=201):
            if case in only:
                method_case(out, bases, case, seed)
        return
    for seed, case in enumerate(MLM_CASES, start=1):
        mlm_case(out, bases, case, seed)
    task_cases(out, bases)
    for seed, case in enumerate(METHOD_CASES, start=201):
        method_case(out, bases, case, seed)
    method_task_case(out, bases)
    print(f"AdapterHub fixtures written under {out} with adapters {adapters.__version__}, "
          f"transformers {transformers.__version__}, torch {torch.__version__}")


def check_exports(fixtures: Path, exports: Path) -> int:
    """Load each xlpeft export under ``exports`` (``adapterhub_method_exports.py``) with ``load_adapter`` and compare
    AdapterHub's logits with the ones xlpeft recorded beside it; returns the number that differ by more than 1e-4."""
    from safetensors.torch import load_file

    transformers.logging.set_verbosity_error()
    bad = 0
    for directory in sorted(d for d in exports.iterdir() if (d / "xlpeft_logits.safetensors").is_file()):
        meta = json.loads((directory / "adapter_config.json").read_text())
        kind = "tiny-xlmr" if meta["model_type"] == "xlm-roberta" else "tiny-bert"
        model = flex_model(kind, fixtures / "bases" / kind)
        name = model.load_adapter(str(directory))
        model.set_active_adapters(name)
        if (directory / "head_config.json").is_file():
            model.active_head = name
        recorded = load_file(str(directory / "xlpeft_logits.safetensors"))
        batch = {k: recorded[k] for k in ("input_ids", "attention_mask")}
        diff = float((logits(model, batch) - recorded["logits"]).abs().max())
        bad += diff > 1e-4
        print(f"{directory.name:24s} {meta['config'].get('architecture') or 'bottleneck':14s} max |diff| {diff:.2g}")
    print(f"{bad} of the exports differ from xlpeft's logits by more than 1e-4")
    return bad


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--check-exports":
        sys.exit(1 if check_exports(Path(sys.argv[2]), Path(sys.argv[3])) else 0)
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/interop/fixtures"), sys.argv[2:])
