"""xlpeft fusion modules exported in AdapterHub's adapter-setup layout, with xlpeft's logits (export-back check).

    .venv/bin/python tools/make_interop_fixtures/adapterhub_fusion_exports.py tests/interop/fixtures /tmp/xlpeft-fusion-exports
    benchmarks/.venv-adapterhub/bin/python tools/make_interop_fixtures/adapterhub_fusion.py --check-exports \
        tests/interop/fixtures /tmp/xlpeft-fusion-exports

Native fusion modules (never seen by AdapterHub: random adapters or Compacters and random fusion
layers, std 0.2, the value matrix around the identity) and the AdapterHub fusion fixtures converted to
xlpeft are composed by xlpeft on tiny BERT and written with ``convert(..., "xlpeft", "adapterhub")``;
each output gets ``xlpeft_logits.safetensors``. The second command loads each with
``load_adapter_setup`` in AdapterHub 1.3.0 and compares.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from adapterhub_method_exports import record
from safetensors.torch import load_file

import xlpeft
from xlpeft.interop import convert
from xlpeft.io import Manifest, save_module
from xlpeft.methods.adapters import AdapterConfig, AdapterModule
from xlpeft.methods.compacter import CompacterConfig, CompacterModule
from xlpeft.methods.fusion import STEM, FusionConfig, FusionModule

NATIVE = {  # name: (method of the fused modules, their configs, fusion config, task head?)
    "fusion_native_adapters": ("adapter", [AdapterConfig(reduction_factor=4), AdapterConfig(reduction_factor=8,
                                                                                             invertible=False)],
                               FusionConfig(fuse="x,y"), False),
    "fusion_native_compacter_task": ("compacter", [CompacterConfig(reduction_factor=4)] * 3,
                                     FusionConfig(fuse="x,y,z", value=False, query_before_ln=True), True),
}
FIXTURE_CASES = ("fusion_dynamic", "fusion_static_houlsby", "fusion_task")


def native(name: str, base, out: Path) -> Path:
    method, configs, config, task = NATIVE[name]
    build = {"adapter": AdapterModule, "compacter": CompacterModule}[method]
    gen = torch.Generator().manual_seed(21)
    fused = [build(c, base.hidden_size, len(base.layers)) for c in configs]
    records = [{"source": "native", "kind": "language", "method": method, "name": f"n{i}", "config": asdict(c)}
               for i, c in enumerate(configs)]
    module = FusionModule(config, fused, base.hidden_size, len(base.layers), records)  # eval: dropout unused
    with torch.no_grad():
        for pname, p in module.named_parameters():
            noise = 0.2 * torch.randn(p.shape, generator=gen)
            p.copy_(noise + torch.eye(p.shape[0]) if pname.endswith("value.weight") else
                    (noise if not pname.endswith("phm_rule") else noise * 5))
    tensors, extra = {STEM: module.state_dict()}, {"fused": records}
    if task:
        tensors["head"] = {"classifier.weight": 0.2 * torch.randn(3, base.hidden_size, generator=gen),
                           "classifier.bias": 0.2 * torch.randn(3, generator=gen)}
        extra.update(labels=["a", "b", "c"], head="token_classification", head_dropout=0.1)
    manifest = Manifest(kind="task" if task else "language", method="fusion", lang=None if task else "xx",
                        task="pos" if task else None, config=asdict(config), extra=extra,
                        base={"name": base.name, "fingerprint": base.fingerprint, "model_type": base.model.config.model_type})
    return save_module(out, manifest, tensors)


def main(fixtures: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    bert = str(fixtures / "bases" / "tiny-bert")
    base = xlpeft.load_base(bert)
    batch = {k: v for k, v in load_file(str(fixtures / "adapterhub" / "seq_bn" / "expected.safetensors")).items()
             if k in ("input_ids", "attention_mask")}
    modules = out / "modules"
    made = [native(name, base, modules / name) for name in NATIVE]
    made += [convert(fixtures / "adapterhub" / case, modules / case, "adapterhub", base=bert) for case in FIXTURE_CASES]
    for module in made:
        exported = convert(module, out / Path(module).name, "xlpeft", "adapterhub")
        record(xlpeft.compose(bert, [module]), batch, exported)
    print(f"{len(made)} fusion exports with xlpeft's logits under {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
