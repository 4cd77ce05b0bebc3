"""xlpeft-built lora / ia3 / prefix / compacter / parallel / mam modules exported for AdapterHub, with xlpeft's logits.

    .venv/bin/python tools/make_interop_fixtures/adapterhub_method_exports.py tests/interop/fixtures /tmp/xlpeft-method-exports
    benchmarks/.venv-adapterhub/bin/python tools/make_interop_fixtures/adapterhub_fixtures.py --check-exports \
        tests/interop/fixtures /tmp/xlpeft-method-exports

The fixture-independent half of the export check: modules that never came from AdapterHub, with
every tensor redrawn (std 0.2; (IA)³ vectors 1 + 0.2 noise), are composed by xlpeft on the tiny
bases and written with ``convert(..., "xlpeft", "adapterhub")``; each output directory gets
``xlpeft_logits.safetensors`` (the input ids, mask and xlpeft's logits). The second command loads
each directory with ``load_adapter`` in AdapterHub 1.3.0 and compares its logits. Also exports every
issue-18 fixture converted to xlpeft (the prefix ones written flat, a form AdapterHub never saved them in).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import xlpeft
from xlpeft.interop import convert
from xlpeft.io import Manifest, save_module
from xlpeft.methods.compacter import CompacterConfig, CompacterModule
from xlpeft.methods.ia3 import IA3Config, IA3Module, ia3_targets
from xlpeft.methods.lora import LoraConfig, LoraModule, resolve_targets
from xlpeft.methods.mam import MAMConfig, MAMModule
from xlpeft.methods.parallel import ParallelConfig, ParallelModule
from xlpeft.methods.prefix import PrefixConfig, PrefixEncoder

NATIVE = {  # name: (base, method, config, task head?)
    "lora_native": ("tiny-bert", "lora", LoraConfig(r=2, alpha=3.0, target_modules="key,intermediate,ffn_output",
                                                     layers="1"), False),
    "lora_native_task": ("tiny-xlmr", "lora", LoraConfig(r=4, alpha=8.0), True),
    "ia3_native": ("tiny-bert", "ia3", IA3Config(target_modules="key,value"), False),
    "prefix_native": ("tiny-bert", "prefix", PrefixConfig(prefix_length=3, width=7), False),
    "xlmr_prefix_native": ("tiny-xlmr", "prefix", PrefixConfig(prefix_length=5, width=16), False),
    "compacter_native": ("tiny-bert", "compacter", CompacterConfig(placement="houlsby", reduction_factor=4, phm_rank=2,
                                                                   factorized_phm=False), False),
    "compacter++_native": ("tiny-bert", "compacter", CompacterConfig(placement="pfeiffer", reduction_factor=4,
                                                                     shared_phm_rule=False), False),
    "parallel_native": ("tiny-bert", "parallel", ParallelConfig(placement="both", reduction_factor=8,
                                                                non_linearity="tanh", scaling=0.5), False),
    "mam_native": ("tiny-bert", "mam", MAMConfig(prefix_length=2, width=5, reduction_factor=4, scaling=3.0), False),
}
FIXTURE_CASES = ("lora", "lora_targets", "lora_leave_out", "xlmr_lora", "ia3_attn", "prefix_tuning", "prefix_tuning_flat",
                 "prefix_tuning_ejected", "xlmr_prefix_tuning", "compacter", "compacter++", "compacter_options", "par_bn",
                 "par_bn_options", "mam", "ner_lora")


def module_tensors(method: str, config, base) -> dict[str, dict[str, torch.Tensor]]:
    hidden, layers = base.hidden_size, len(base.layers)
    if method == "lora":
        paths = resolve_targets(base, config)
        tensors = {"lora": LoraModule(config, {i: {s: lin for s, (_, lin) in d.items()} for i, d in paths.items()}).state_dict()}
    elif method == "ia3":
        tensors = {"ia3": IA3Module(config, ia3_targets(base, config)).state_dict()}
    elif method == "prefix":
        tensors = {"prefix": PrefixEncoder(config, hidden, layers).export()}
    elif method == "compacter":
        tensors = {"compacter": CompacterModule(config, hidden, layers).state_dict()}
    elif method == "parallel":
        tensors = {"parallel": ParallelModule(config, hidden, layers).state_dict()}
    else:
        tensors = MAMModule(config, hidden, layers).export()
    gen = torch.Generator().manual_seed(11)
    return {stem: {k: (1.0 if method == "ia3" else 0.0) + 0.2 * torch.randn(v.shape, generator=gen)
                   for k, v in state.items()} for stem, state in tensors.items()}


@torch.no_grad()
def record(model, batch: dict[str, torch.Tensor], out: Path) -> None:
    logits = model.eval()(**batch).logits
    save_file({**batch, "logits": logits.contiguous()}, str(out / "xlpeft_logits.safetensors"))


def main(fixtures: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    modules = out / "modules"
    batches = {kind: {k: v for k, v in load_file(str(fixtures / "adapterhub" / case / "expected.safetensors")).items()
                      if k in ("input_ids", "attention_mask")}
               for kind, case in (("tiny-bert", "seq_bn"), ("tiny-xlmr", "xlmr_seq_bn_inv"))}
    for name, (kind, method, config, task) in NATIVE.items():
        base = xlpeft.load_base(str(fixtures / "bases" / kind))
        tensors = module_tensors(method, config, base)
        extra = {}
        if task:
            gen = torch.Generator().manual_seed(12)
            tensors["head"] = {"classifier.weight": 0.2 * torch.randn(3, base.hidden_size, generator=gen),
                               "classifier.bias": 0.2 * torch.randn(3, generator=gen)}
            extra = {"labels": ["a", "b", "c"], "head": "token_classification", "head_dropout": 0.1}
        manifest = Manifest(kind="task" if task else "language", method=method, lang=None if task else "sw",
                            task="pos" if task else None, config=asdict(config), extra=extra,
                            base={"name": str(fixtures / "bases" / kind), "fingerprint": base.fingerprint,
                                  "model_type": base.model.config.model_type})
        module = save_module(modules / name, manifest, tensors)
        exported = convert(module, out / name, "xlpeft", "adapterhub")
        record(xlpeft.compose(str(fixtures / "bases" / kind), [module]), batches[kind], exported)
    for case in FIXTURE_CASES:
        kind = "tiny-xlmr" if case.startswith("xlmr") else "tiny-bert"
        module = convert(fixtures / "adapterhub" / case, modules / case, "adapterhub", base=str(fixtures / "bases" / kind))
        exported = convert(module, out / case, "xlpeft", "adapterhub")
        record(xlpeft.compose(str(fixtures / "bases" / kind), [module]), batches[kind], exported)
    print(f"{len(NATIVE) + len(FIXTURE_CASES)} AdapterHub exports with xlpeft's logits under {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
