"""AdapterFusion fixtures made with the `adapters` library itself (run in its own venv, see README.md).

    benchmarks/.venv-adapterhub/bin/python tools/make_interop_fixtures/adapterhub_fusion.py tests/interop/fixtures
    benchmarks/.venv-adapterhub/bin/python tools/make_interop_fixtures/adapterhub_fusion.py --check-exports FIXTURES EXPORTS

Each case adds bottleneck adapters and an AdapterFusion layer (Pfeiffer et al., EACL 2021) to a
flexible-head model on the tiny BERT base (``bases/`` of ``adapterhub_fixtures.py``, which must run
first), draws every adapter, fusion and head weight from a fixed seed (the fusion's value matrix
around the identity it starts from), records the logits of the active setup for the fixed input ids
and writes the setup with ``save_adapter_setup``: ``adapter_setup.json``, one folder per adapter, one
for the fusion (``a,b``) and one for the head. That is AdapterHub's own layout for a fusion.

``--check-exports`` loads each of xlpeft's exports (``export_for_check.py`` writes them) with
``load_adapter_setup`` and compares AdapterHub's logits with the ones xlpeft recorded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import adapters
import torch
import transformers
from adapterhub_fixtures import flex_model, logits
from adapters import AdapterFusionConfig, DoubleSeqBnConfig, SeqBnConfig, SeqBnInvConfig
from adapters.composition import Fuse, Stack
from safetensors.torch import load_file, save_file
from tiny_bases import input_batch

# name: (adapter configs by name, fusion config, head: None (the MLM head) or a tagging head's label count,
#        a language adapter stacked under the fusion or None)
CASES = {
    # two MAD-X language adapters with invertible adapters fused under the MLM head: AdapterHub applies the
    # invertible adapter of the first fused adapter (and its inverse before the decoder)
    "fusion_dynamic": ({"tr": SeqBnInvConfig(reduction_factor=4), "id": SeqBnInvConfig(reduction_factor=4)},
                       AdapterFusionConfig.load("dynamic"), None, None),
    # three Houlsby adapters (after attention and FFN), the static fusion (no value matrix), other flags
    "fusion_static_houlsby": ({n: DoubleSeqBnConfig(reduction_factor=4) for n in ("a", "b", "c")},
                              AdapterFusionConfig.load("static", query_before_ln=True), None, None),
    # task adapters fused under a tagging head, over a MAD-X language adapter (Stack(lang, Fuse(...))), with
    # the residual added before the attention and the value matrix after it
    "fusion_task": ({"a": SeqBnConfig(reduction_factor=4), "b": SeqBnConfig(reduction_factor=8)},
                    AdapterFusionConfig.load("dynamic", residual_before=True, value_before_softmax=False), 5, "sw"),
}


def randomise(model, marks: tuple[str, ...], seed: int) -> None:
    """Std-0.2 noise on every tensor whose name holds a mark; a fusion value matrix is the identity plus noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if any(m in pname for m in marks):
                noise = 0.2 * torch.randn(p.shape, generator=gen)
                p.copy_(noise + torch.eye(p.shape[0]) if pname.endswith("value.weight") else noise)


def case(out: Path, bases: Path, name: str, seed: int) -> None:
    children, fusion_config, labels, lang = CASES[name]
    batch = input_batch("tiny-bert")
    model = flex_model("tiny-bert", bases / "tiny-bert")
    bare = logits(model, batch)
    for child, config in children.items():
        model.add_adapter(child, config=config)
    fuse = Fuse(*children)
    model.add_adapter_fusion(fuse, config=fusion_config)
    marks = tuple(f".adapters.{c}." for c in children) + tuple(f"invertible_adapters.{c}." for c in children)
    marks += (f"adapter_fusion_layer.{fuse.name}.",)
    head = None
    if labels is not None:
        head = "pos"
        model.add_tagging_head(head, num_labels=labels)
        marks += (f"heads.{head}.",)
    randomise(model, marks, seed)
    setup = fuse
    if lang is not None:
        model.add_adapter(lang, config=SeqBnInvConfig(reduction_factor=4))
        randomise(model, (f".adapters.{lang}.", f"invertible_adapters.{lang}."), seed + 50)
        setup = Stack(lang, fuse)
    model.set_active_adapters(setup)
    if head is not None:
        model.active_head = head
    expected = {"logits": logits(model, batch)}
    if lang is not None:
        model.set_active_adapters(fuse)
        expected["fuse_only_logits"] = logits(model, batch)
        model.set_active_adapters(setup)
    assert (expected["logits"] - bare).abs().max() > 0.1 if head is None else True, f"{name}: barely changes the logits"
    target = out / "adapterhub" / name
    model.save_adapter_setup(str(target), setup, head_setup=head)
    save_file({**batch, **expected}, str(target / "expected.safetensors"))


def check_exports(fixtures: Path, exports: Path) -> int:
    """Load each xlpeft fusion export with ``load_adapter_setup``; count those whose logits differ by more than 1e-4."""
    transformers.logging.set_verbosity_error()
    bad = 0
    for directory in sorted(d for d in exports.iterdir() if (d / "adapter_setup.json").is_file()):
        model = flex_model("tiny-bert", fixtures / "bases" / "tiny-bert")
        setup, head = model.load_adapter_setup(str(directory), set_active=True)
        recorded = load_file(str(directory / "xlpeft_logits.safetensors"))
        batch = {k: recorded[k] for k in ("input_ids", "attention_mask")}
        diff = float((logits(model, batch) - recorded["logits"]).abs().max())
        bad += diff > 1e-4
        print(f"{directory.name:28s} {setup!s:40.40s} head {head!s:8s} max |diff| {diff:.2g}")
    print(f"{bad} of the fusion exports differ from xlpeft's logits by more than 1e-4")
    return bad


def main(out: Path) -> None:
    transformers.logging.set_verbosity_error()
    if not (out / "bases" / "tiny-bert" / "config.json").is_file():
        sys.exit(f"{out}/bases/tiny-bert is missing: run adapterhub_fixtures.py {out} first")
    for seed, name in enumerate(CASES, start=301):
        case(out, out / "bases", name, seed)
    print(f"AdapterFusion fixtures written under {out}/adapterhub with adapters {adapters.__version__}, "
          f"transformers {transformers.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--check-exports":
        sys.exit(1 if check_exports(Path(sys.argv[2]), Path(sys.argv[3])) else 0)
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/interop/fixtures"))
