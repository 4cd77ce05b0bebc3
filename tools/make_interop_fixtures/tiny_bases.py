"""Tiny random BERT and XLM-R masked-LM bases shared by the interop fixture generators.

Runs inside the foreign virtual environment (transformers 4.57, see README.md). Every weight is
drawn from a fixed seed with a large spread (std 0.2, LayerNorm gains around 1) so that logits
are O(1) and any mismatch in where an adapter or a delta acts shows far above the 1e-4 tolerance.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    PreTrainedTokenizerFast,
    XLMRobertaConfig,
    XLMRobertaForMaskedLM,
)

VOCAB = 120
SPECIALS = {
    "tiny-bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "tiny-xlmr": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
}
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=40, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def tokenizer_for(kind: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``w5 .. w119`` (the fixtures feed input ids directly; this only lets bases load)."""
    specials = SPECIALS[kind]
    vocab = {tok: i for i, tok in enumerate(specials)} | {f"w{i}": i for i in range(len(specials), VOCAB)}
    unk = specials[1] if kind == "tiny-bert" else specials[3]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "tiny-bert":
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>")


def build_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "tiny-bert":
        model = BertForMaskedLM(BertConfig(pad_token_id=0, **COMMON))
    else:
        model = XLMRobertaForMaskedLM(XLMRobertaConfig(pad_token_id=1, bos_token_id=0, eos_token_id=2, **COMMON))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.2 * torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + noise if name.endswith(("LayerNorm.weight", "layer_norm.weight")) else noise)
    return model.eval()


def build_base(kind: str, out_dir: Path) -> Path:
    """Write ``out_dir`` (config.json, model.safetensors, tokenizer files) and return it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(kind)
    model.config.name_or_path = kind
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer_for(kind).save_pretrained(out_dir)
    return out_dir


def input_batch(kind: str) -> dict[str, torch.Tensor]:
    """Two sequences of 12 tokens, the second padded after 8, with the model's own special and pad ids."""
    cls, sep, pad = (2, 3, 0) if kind == "tiny-bert" else (0, 2, 1)
    gen = torch.Generator().manual_seed(7)
    body = torch.randint(5, VOCAB, (2, 10), generator=gen)
    ids = torch.cat([torch.full((2, 1), cls), body, torch.full((2, 1), sep)], dim=1)
    ids[1, 8] = sep
    ids[1, 9:] = pad
    return {"input_ids": ids, "attention_mask": (ids != pad).long()}
