"""xlpeft's prefix / prompt tuning against peft 0.21.2's PREFIX_TUNING / PROMPT_TUNING on tiny BERT and XLM-R.

What peft 0.21.2 can run on transformers 5.24 encoders (measured here, see the first test):

* masked LMs: only as task type FEATURE_EXTRACTION (``task_type=None`` raises ``KeyError: None`` in
  ``get_peft_model``); it passes ``past_key_values`` through the MLM model's ``**kwargs`` to
  ``BertModel``, whose ``deprecate_kwarg`` maps it to ``cache``. Prefix and prompt both run.
* TOKEN_CLS / SEQ_CLS prefix tuning raises "Model does not support past key values": peft looks for a
  ``past_key_values`` parameter in ``*ForTokenClassification.forward`` (only ``**kwargs``) and in
  ``BertModel.forward`` (renamed ``cache`` in transformers 5). The token-classification comparison
  below gives the backbone instance a forward that accepts the old name (test-only, on peft's side),
  so the rest is peft's own code. TOKEN_CLS prompt tuning runs unchanged.

peft numbers the real tokens from P when prefixes arrive as a cache; converted modules carry
``shift_positions=true`` and reproduce that exactly.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

from tests.methods.test_contract import save
from xlpeft.interop.peft import export_peft, import_peft
from xlpeft.io import load_module
from xlpeft.methods.prefix import PrefixConfig, SavedPrefixes, attach_prefix
from xlpeft.models import arch_for, load_base
from xlpeft.registry import get_method

P = 4
TOL = 1e-5
CONFIGS = {"prefix": lambda task: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P, prefix_projection=True,
                                                           encoder_hidden_size=16),
           "prompt": lambda task: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=P)}


def batch(model) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch: row 1 holds 5 real tokens then the pad id."""
    ids = torch.randint(5, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = model.config.pad_token_id
    return ids, mask


def peft_model(cls, base_dir, kind: str, task: str, seed: int, **kw):
    """A peft prompt-learning model with non-trivial prompt-encoder weights (MLP included), and its base's state."""
    torch.manual_seed(seed)
    model = cls.from_pretrained(str(base_dir), **kw).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = peft.get_peft_model(model, CONFIGS[kind](task))
    for p in wrapped.prompt_encoder.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return wrapped.eval(), state


@torch.no_grad()
def peft_logits(model, ids, mask, kind: str) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask).logits
    return out[:, P:] if kind == "prompt" else out  # peft returns P + T positions for prompts


@torch.no_grad()
def xlpeft_logits(base, module_dir, ids, mask) -> torch.Tensor:
    handle = get_method("prefix").apply(base, load_module(module_dir))
    out = base.model.eval()(input_ids=ids, attention_mask=mask).logits
    handle.remove()
    return out


def test_what_peft_can_run_on_transformers_5_encoders(base_dirs):
    for cls, task in ((AutoModelForTokenClassification, "TOKEN_CLS"), (AutoModelForSequenceClassification, "SEQ_CLS")):
        model = cls.from_pretrained(str(base_dirs["tiny-bert"]), num_labels=3)
        wrapped = peft.get_peft_model(model, CONFIGS["prefix"](task))
        with pytest.raises(ValueError, match="does not support past key values"):
            wrapped(input_ids=torch.tensor([[5, 6, 7]]))
    with pytest.raises(KeyError):
        peft.get_peft_model(AutoModelForMaskedLM.from_pretrained(str(base_dirs["tiny-bert"])), CONFIGS["prefix"](None))


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
@pytest.mark.parametrize("arch", ["tiny-bert", "tiny-xlmr"])
def test_masked_lm_logits_equal_peft(base_dirs, tmp_path, arch, kind):
    """peft's saved adapter, converted, gives peft's MLM logits on a padded batch; unconverted weights do not."""
    model, _ = peft_model(AutoModelForMaskedLM, base_dirs[arch], kind, "FEATURE_EXTRACTION", seed=0)
    ids, mask = batch(model)
    expected = peft_logits(model, ids, mask, kind)
    model.save_pretrained(tmp_path / "peft")
    base = load_base(str(base_dirs[arch]))
    module = import_peft(tmp_path / "peft", tmp_path / "xlpeft", base)
    got = xlpeft_logits(base, module, ids, mask)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= TOL
    # negative control: another peft adapter's (random) prompt weights, converted the same way, miss
    other, _ = peft_model(AutoModelForMaskedLM, base_dirs[arch], kind, "FEATURE_EXTRACTION", seed=1)
    other.save_pretrained(tmp_path / "other")
    wrong = xlpeft_logits(base, import_peft(tmp_path / "other", tmp_path / "xlpeft-other", base), ids, mask)
    assert float((wrong - expected).abs().max()) > 1e-3


def test_token_classification_logits_equal_peft(base_dirs):
    """TOKEN_CLS prefix (peft's forward, its backbone given back the ``past_key_values`` name) and prompt tuning."""
    for kind in ("prefix", "prompt"):
        model, state = peft_model(AutoModelForTokenClassification, base_dirs["tiny-xlmr"], kind, "TOKEN_CLS", seed=2,
                                  num_labels=3)
        if kind == "prefix":
            backbone = model.base_model.get_submodule(model.transformer_backbone_name)
            forward = backbone.forward

            def old_name(input_ids=None, attention_mask=None, past_key_values=None, _f=forward, **kw):
                return _f(input_ids=input_ids, attention_mask=attention_mask, cache=past_key_values, **kw)
            backbone.forward = old_name
        ids, mask = batch(model)
        expected = peft_logits(model, ids, mask, kind)
        ours = AutoModelForTokenClassification.from_pretrained(str(base_dirs["tiny-xlmr"]), num_labels=3).eval()
        ours.load_state_dict(state)
        emb = model.get_prompt_embedding_to_save("default")  # what peft saves, (P, 2LH) or (P, H)
        h, n = ours.config.hidden_size, ours.config.num_hidden_layers
        if kind == "prefix":
            per_layer = emb.view(P, n, 2, h)
            source = SavedPrefixes(PrefixConfig(prefix_length=P, shift_positions=True),
                                   {"key": per_layer[:, :, 0].transpose(0, 1), "value": per_layer[:, :, 1].transpose(0, 1)})
        else:
            source = SavedPrefixes(PrefixConfig(prefix_length=P, layers="input"), {"prompt": emb})
        handle = attach_prefix(ours, arch_for(ours), source)
        with torch.no_grad():
            got = ours(input_ids=ids, attention_mask=mask).logits
        handle.remove()
        assert float((got - expected).abs().max()) <= TOL, kind


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_export_writes_peft_files_peft_loads(base_dirs, tmp_path, kind):
    """import -> export gives peft's tensor back exactly; peft loading the export reproduces xlpeft's logits."""
    model, _ = peft_model(AutoModelForMaskedLM, base_dirs["tiny-bert"], kind, "FEATURE_EXTRACTION", seed=3)
    model.save_pretrained(tmp_path / "peft")
    base = load_base(str(base_dirs["tiny-bert"]))
    module = import_peft(tmp_path / "peft", tmp_path / "xlpeft", base)
    state = load_module(module).tensors["prefix"]
    # a module xlpeft wrote itself (no imported record): the same tensors, saved as an xlpeft module
    cfg = PrefixConfig(**load_module(module).manifest.config)
    own = save(base, "prefix", "language", cfg, {"prefix": state}, {}, None, tmp_path / "own")
    out = export_peft(own, tmp_path / "exported", base=base)
    assert torch.equal(load_file(str(out / "adapter_model.safetensors"))["prompt_embeddings"],
                       load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))["prompt_embeddings"])
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == (
        "PREFIX_TUNING" if kind == "prefix" else "PROMPT_TUNING")
    loaded = peft.PeftModelForFeatureExtraction.from_pretrained(
        AutoModelForMaskedLM.from_pretrained(str(base_dirs["tiny-bert"])), str(out)).eval()
    ids, mask = batch(loaded)
    assert float((peft_logits(loaded, ids, mask, kind) - xlpeft_logits(base, own, ids, mask)).abs().max()) <= TOL


def test_export_of_unshifted_prefix_warns(base_dirs, tmp_path):

    base = load_base(str(base_dirs["tiny-bert"]))
    n, h = len(base.layers), base.hidden_size
    cfg = PrefixConfig(prefix_length=P)
    own = save(base, "prefix", "language", cfg, {"prefix": {"key": torch.randn(n, P, h), "value": torch.randn(n, P, h)}},
               {}, None, tmp_path / "own")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_peft(own, tmp_path / "exported", base=base)
    assert any("shift_positions=false" in str(w.message) for w in caught)
