"""A minimal reimplementation of composable-sft's ``SFT`` file format and ``apply`` (the package is not on PyPI).

Written from a reading of cambridgeltl/composable-sft ``src/sft/sft.py`` (``encode_sparse_tensor``,
``decode_sparse_tensor``, ``SFT.add_param/save/apply``; see tests/interop/fixtures/README.md for
the versions read). Nothing is copied; the behaviour reproduced is:

* a difference tensor is stored sparse. The current layout is
  ``{"diffs": {name: encoding}, "abs": {name: dense tensor}}`` where an encoding is
  ``{"size": torch.Size, "index_steps": [first index, then gaps], "values": tensor}`` over indices
  flattened with the **first** dimension varying fastest (multipliers ``cumprod([1] + size[:-1])``),
  sorted ascending; the first step is a numpy int64 (it is ``indices[0]`` of a numpy array), the
  others Python ints. Earlier code wrote ``{"body": {name: coalesced sparse COO tensor},
  "head": {name: dense tensor}}``.
* ``apply(model, with_abs)``: ``param += diff`` for every diff (the sparse tensor added to the
  dense parameter), then, if ``with_abs``, ``param.copy_(value)`` for every dense ("abs"/"head") entry.
"""

from __future__ import annotations

import os

import numpy as np
import torch

FILE = "pytorch_diff.bin"


def encode(sparse: torch.Tensor) -> dict:
    """A coalesced sparse COO tensor -> composable-sft's ``size``/``index_steps``/``values`` encoding."""
    size = list(sparse.size())
    multipliers = np.cumprod([1] + size[:-1], dtype=np.int64)  # first dimension fastest
    coords = np.array(sparse.indices(), dtype=np.int64)
    flat = multipliers @ coords
    order = np.argsort(flat, kind="stable")
    flat = flat[order]
    steps = (flat[1:] - flat[:-1]).tolist()
    if len(flat):
        steps = [flat[0]] + steps  # a numpy int64 first, as composable-sft writes it
    return {"size": sparse.size(), "index_steps": steps, "values": sparse.values()[torch.from_numpy(order)]}


def decode(encoding: dict) -> torch.Tensor:
    size = list(encoding["size"])
    flat = np.cumsum(np.asarray(encoding["index_steps"], dtype=np.int64))
    divisors = np.concatenate([[1], np.cumprod(size[:-1], dtype=np.int64)])
    coords = (flat[None, :] // divisors[:, None]) % np.asarray(size, dtype=np.int64)[:, None]
    return torch.sparse_coo_tensor(torch.from_numpy(coords), encoding["values"], size=size,
                                   check_invariants=True).coalesce()


class ReferenceSFT:
    """Sparse diffs + dense values, saved and applied the way composable-sft does."""

    def __init__(self) -> None:
        self.diffs: dict[str, torch.Tensor] = {}
        self.abs: dict[str, torch.Tensor] = {}

    def add_param(self, name: str, tensor: torch.Tensor, diff: bool = True) -> None:
        if diff:
            self.diffs[name] = tensor.to_sparse().coalesce()
        else:
            self.abs[name] = tensor.detach().to("cpu").clone()

    def save(self, directory: str, layout: str = "diffs") -> None:
        os.makedirs(directory, exist_ok=True)
        if layout == "diffs":
            payload = {"diffs": {n: encode(d) for n, d in self.diffs.items()}, "abs": self.abs}
        elif layout == "body":
            payload = {"body": dict(self.diffs)}
            if self.abs:
                payload["head"] = self.abs
        else:
            raise ValueError(f"layout should be diffs or body; got {layout!r}")
        torch.save(payload, os.path.join(directory, FILE))

    @classmethod
    def load(cls, directory: str) -> ReferenceSFT:
        """Read either layout (the file is trusted here: it is ours or xlpeft's export under test)."""
        payload = torch.load(os.path.join(directory, FILE), weights_only=False)
        sft = cls()
        body = payload.get("diffs", payload.get("body", {}))
        sft.diffs = {n: d.coalesce() if isinstance(d, torch.Tensor) else decode(d) for n, d in body.items()}
        sft.abs = dict(payload.get("abs", payload.get("head") or {}))
        return sft

    @torch.no_grad()
    def apply(self, model, with_abs: bool = True) -> None:
        for name, diff in self.diffs.items():
            param = model.get_parameter(name)
            param += diff.to(param.device)
        if with_abs:
            for name, value in self.abs.items():
                model.get_parameter(name).copy_(value)
