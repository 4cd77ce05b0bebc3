"""Shared pieces of the interop tests: the committed fixtures (made by the home libraries) and a logits helper."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOLERANCE = 1e-4  # the bar; the cases measured so far agree exactly


def base_dir(kind: str) -> str:
    return str(FIXTURES / "bases" / kind)


def expected(fmt: str, case: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / fmt / case / "expected.safetensors"))


@torch.no_grad()
def max_diff(model, exp: dict[str, torch.Tensor], key: str = "logits") -> float:
    """Largest |logit - home library's logit| on the fixture's input ids (all positions, padding included)."""
    out = model.eval()(input_ids=exp["input_ids"], attention_mask=exp["attention_mask"]).logits
    assert out.shape == exp[key].shape
    return float((out - exp[key]).abs().max())
