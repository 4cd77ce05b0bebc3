"""(IA)³ against the math written out by hand: scaled keys/values/FFN activations equal folded weights; two multiply.

The method contract is ``tests/methods/test_contract.py``; peft equivalence ``tests/interop/test_peft.py``.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from xlpeft.config import TrainConfig
from xlpeft.errors import ConfigError
from xlpeft.io import Manifest, load_module, save_module
from xlpeft.methods.ia3 import IA3Config, apply_ia3, prepare_ia3
from xlpeft.models import get_submodule, load_base
from xlpeft.recipes.common import resolve_configs


@pytest.fixture(params=["tiny-bert", "tiny-xlmr"])
def base(request, base_dirs):
    return load_base(str(base_dirs[request.param]))


def make_module(base, tmp_path, cfg: IA3Config, seed: int, name: str):
    trainable = prepare_ia3(base, cfg, TrainConfig())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable.module.parameters():
            p.mul_(1 + 0.5 * torch.randn(p.shape, generator=gen))  # scales away from their init, 1
    tensors, _ = trainable.export()
    trainable.close()
    manifest = Manifest(kind="language", method="ia3", config=dataclasses.asdict(cfg), lang="sw",
                        base={"name": base.name, "fingerprint": base.fingerprint,
                              "model_type": base.model.config.model_type})
    return load_module(save_module(tmp_path / name, manifest, tensors))


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("value, named", [("key,query", "unknown: 'query'"), ("key,key", "names a site twice"),
                                          ("key,,value", "unknown: ''")])
def test_bad_targets_are_one_line_errors(value, named):
    with pytest.raises(ConfigError) as info:
        resolve_configs("ia3", "task", {"target_modules": value})
    assert named in str(info.value) and "\n" not in str(info.value)


def test_scaling_equals_the_weights_folded_by_hand(base, tmp_path):
    """l_k ⊙ (W_k x + b_k) = (diag(l_k) W_k) x + l_k ⊙ b_k; l_ff ⊙ γ(W1 x) feeds W2, i.e. W2 diag(l_ff)."""
    module = make_module(base, tmp_path, IA3Config(), seed=0, name="m")
    folded = copy.deepcopy(base.model)
    state, arch = module.tensors["ia3"], base.arch
    with torch.no_grad():
        for i, layer in enumerate(get_submodule(folded, arch.layers)):
            for site, path in (("key", arch.key), ("value", arch.value)):
                lin = get_submodule(layer, f"{arch.self_attention}.{path}")
                lin.weight.mul_(state[f"layers.{i}.{site}"][:, None])
                lin.bias.mul_(state[f"layers.{i}.{site}"])
            get_submodule(layer, f"{arch.ffn_output}.dense").weight.mul_(state[f"layers.{i}.intermediate"][None, :])
    ids = torch.randint(5, len(base.tokenizer), (2, 9), generator=torch.Generator().manual_seed(1))
    bare = logits(base.model, ids)
    handle = apply_ia3(base, module)
    got = logits(base.model, ids)
    handle.remove()
    assert (got - bare).abs().max() > 1e-3, "the scales change the logits"
    torch.testing.assert_close(got, logits(folded, ids), rtol=0, atol=1e-5)
    assert torch.equal(logits(base.model, ids), bare), "removed: the bare base again"


def test_two_modules_multiply(base, tmp_path):
    lower = make_module(base, tmp_path, IA3Config(), seed=1, name="lower")
    upper = make_module(base, tmp_path, IA3Config(target_modules="value,intermediate"), seed=2, name="upper")
    product = {k: v * upper.tensors["ia3"].get(k, torch.ones_like(v)) for k, v in lower.tensors["ia3"].items()}
    ids = torch.randint(5, len(base.tokenizer), (2, 9), generator=torch.Generator().manual_seed(3))
    h1, h2 = apply_ia3(base, lower), apply_ia3(base, upper)
    stacked = logits(base.model, ids)
    h2.remove()
    h1.remove()
    one = apply_ia3(base, dataclasses.replace(lower, tensors={"ia3": product}))
    torch.testing.assert_close(logits(base.model, ids), stacked, rtol=0, atol=1e-6)
    one.remove()
