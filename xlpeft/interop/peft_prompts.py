"""peft 0.21 PREFIX_TUNING / PROMPT_TUNING adapters <-> xlpeft ``prefix`` modules (rows of :data:`xlpeft.interop.peft.PEFT_TYPES`).

    xlpeft convert ./peft-prefix modules/lang-sw-prefix --from peft --base xlmr
    xlpeft convert modules/lang-sw-prefix ./peft-out --from xlpeft --to peft

What maps (checked against peft 0.21.2 ``peft_model.py`` ``get_prompt`` / ``get_prompt_embedding_to_save``):

* peft saves one tensor, ``prompt_embeddings``: for PREFIX_TUNING the prefix encoder's *output*
  (P, num_layers * 2 * token_dim), its MLP (``prefix_projection``) already run, as Li & Liang 2021
  and xlpeft's export do; ``get_prompt`` views it as (P, 2L, heads, d), so columns
  ``[2iH, (2i+1)H)`` are layer ``i``'s key prefix and ``[(2i+1)H, (2i+2)H)`` its value prefix ->
  xlpeft ``key[i]`` / ``value[i]`` (L, P, H). For PROMPT_TUNING, the virtual word embeddings
  (P, token_dim) -> xlpeft ``prompt`` (``layers=input``, Lester et al. 2021).
* peft hands prefixes to the model as ``past_key_values``, so BERT/XLM-R number the real tokens
  from P (``cache_length``); an imported prefix module sets ``shift_positions=true`` to reproduce
  peft's logits. Exporting a module trained with ``shift_positions=false`` (the default) warns:
  in peft its tokens would move by P positions.

Refused by name: ``num_transformer_submodules`` other than 1 (encoder-decoder), ``token_dim`` or
``num_layers`` that are not the base's, multitask / P-tuning / other prompt-learning types.
peft 0.21.2 runs these adapters on a masked LM as task type FEATURE_EXTRACTION
(``PeftModelForFeatureExtraction``); exported files carry no task type, so load them with that
class (``PeftModelForFeatureExtraction.from_pretrained``): peft's plain ``PeftModel`` ignores prompts.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from xlpeft.config import build
from xlpeft.errors import ConfigError, XlpeftError
from xlpeft.methods.prefix import STEM, PrefixConfig

TENSOR = "prompt_embeddings"


def _hidden(skel) -> int:
    return int(skel.linears["query"][1].in_features) if "query" in skel.linears else int(
        next(iter(skel.linears.values()))[1].in_features)


def _embeddings(config: dict, tensors: Mapping[str, torch.Tensor], skel, src: Path, width: int) -> torch.Tensor:
    """The checked ``prompt_embeddings`` tensor (P, width) of a peft prompt-learning adapter."""
    if config.get("num_transformer_submodules", 1) not in (1, None):
        raise XlpeftError(f"{src}: num_transformer_submodules={config['num_transformer_submodules']!r}: an "
                          "encoder-decoder adapter; xlpeft bases are encoders (expected 1)")
    hidden = _hidden(skel)
    bad = [f"{k}={config.get(k)!r} (the base has {v})" for k, v in
           (("token_dim", hidden), ("num_layers", skel.num_layers)) if config.get(k) not in (None, v)]
    if bad:
        raise XlpeftError(f"{src}: the adapter does not fit this base: {'; '.join(bad)}; convert against the base "
                          "it was trained on")
    if set(tensors) != {TENSOR}:
        raise XlpeftError(f"{src}: expected one tensor {TENSOR!r} in the adapter weights; got {sorted(tensors)}")
    emb = tensors[TENSOR]
    p = int(config.get("num_virtual_tokens") or 0)
    if tuple(emb.shape) != (p, width):
        raise XlpeftError(f"{src}: {TENSOR} has shape {tuple(emb.shape)}; expected ({p}, {width}) from "
                          f"num_virtual_tokens={p} on this base")
    return emb


def _config(src: Path, **fields) -> PrefixConfig:
    try:
        return PrefixConfig(**fields)
    except ConfigError as exc:
        raise XlpeftError(f"{src}: {exc}") from None


def read_prefix(config: dict, tensors: Mapping[str, torch.Tensor], skel, src: Path):
    """peft PREFIX_TUNING -> (PrefixConfig, {"prefix": {key, value}}, key prefix "")."""
    h, n = _hidden(skel), skel.num_layers
    emb = _embeddings(config, tensors, skel, src, n * 2 * h)
    p = emb.shape[0]
    per_layer = emb.reshape(p, n, 2, h)  # peft's view: layer i's key, then its value
    state = {"key": per_layer[:, :, 0].transpose(0, 1).contiguous(),  # (L, P, H)
             "value": per_layer[:, :, 1].transpose(0, 1).contiguous()}  # (L, P, H)
    cfg = _config(src, prefix_length=p, layers="all", reparameterise=bool(config.get("prefix_projection")),
                  width=int(config.get("encoder_hidden_size") or 512), shift_positions=True)
    return cfg, {STEM: state}, ""


def read_prompt(config: dict, tensors: Mapping[str, torch.Tensor], skel, src: Path):
    """peft PROMPT_TUNING -> (PrefixConfig(layers=input), {"prefix": {prompt}}, key prefix "")."""
    emb = _embeddings(config, tensors, skel, src, _hidden(skel))
    return _config(src, prefix_length=emb.shape[0], layers="input"), {STEM: {"prompt": emb.contiguous()}}, ""


def _heads(skel) -> int:
    from transformers import AutoConfig

    from xlpeft.models import resolve_base_dir

    return int(AutoConfig.from_pretrained(resolve_base_dir(skel.base_ref["name"])).num_attention_heads)


def _common(cfg: PrefixConfig, skel) -> dict:
    return {"num_virtual_tokens": cfg.prefix_length, "token_dim": _hidden(skel), "num_layers": skel.num_layers,
            "num_attention_heads": _heads(skel), "num_transformer_submodules": 1, "modules_to_save": None}


def write_prefix(module, skel, prefix: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """xlpeft prefix module (layers=all) -> (peft PREFIX_TUNING adapter_config, {"prompt_embeddings": (P, 2LH)})."""
    cfg = build(PrefixConfig, module.manifest.config)
    state = module.tensors[STEM]
    if cfg.layers == "input":
        return write_prompt(module, skel, prefix)
    if not cfg.shift_positions:
        warnings.warn(f"{module.path}: trained with shift_positions=false; peft passes prefixes as past_key_values "
                      f"and numbers the tokens from {cfg.prefix_length}, so its logits will differ from xlpeft's",
                      stacklevel=2)
    key, value = state["key"], state["value"]  # (L, P, H) each
    emb = torch.stack([key, value], dim=2).transpose(0, 1).reshape(cfg.prefix_length, -1)  # (P, L*2*H)
    config = {"peft_type": "PREFIX_TUNING", **_common(cfg, skel), "encoder_hidden_size": cfg.width,
              "prefix_projection": False, "init_weights": None}
    return config, {TENSOR: emb.contiguous()}


def write_prompt(module, skel, prefix: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """xlpeft prefix module (layers=input) -> (peft PROMPT_TUNING adapter_config, {"prompt_embeddings": (P, H)})."""
    cfg = build(PrefixConfig, module.manifest.config)
    config = {"peft_type": "PROMPT_TUNING", **_common(cfg, skel), "prompt_tuning_init": "RANDOM",
              "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "tokenizer_kwargs": None}
    return config, {TENSOR: module.tensors[STEM]["prompt"].contiguous()}


__all__ = ["read_prefix", "read_prompt", "write_prefix", "write_prompt"]
