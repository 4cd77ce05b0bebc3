"""Gradients at a sparse delta's K entries without the weights' dense gradients (issue 19).

In a sparse phase only the K selected entries train, yet autograd would build the dense gradient
of every weight it sees requiring grad: 1x the model in memory for the tied 120k-250k-row word
embedding matrix alone (the MLM decoder's gradient lives from the head's backward to the
embeddings'), and one full weight-gradient product per matrix. Here the weights stay frozen and an
autograd tap on each module that reads them computes the gradient at the entries only:

* ``nn.Linear`` (``y = x W^T + b``): ``dL/dW[i, j] = sum_t dy[t, i] x[t, j]`` at the K_i entries,
  either *sampled* (an SDDMM, ``torch.sparse.sampled_addmm`` over the entries' CSR pattern: O(T K_i))
  or *dense* (the product ``dy^T x`` row block by row block, at most :data:`CHUNK` entries at a time,
  gathered at the entries: the FLOPs of autograd's weight gradient, with no dense buffer kept);
* ``nn.Embedding``: only the rows of the tokens in the batch receive gradient, so the batch's
  gradient is summed per distinct token (``(u, H)``, u <= batch tokens) and read at the entries of
  those rows: no dense gradient of the vocabulary matrix at all;
* a tied decoder (MLM head ``decoder.weight is word_embeddings.weight``) is just one more Linear
  tap on the same entries; autograd sums the two contributions into ``values.grad``.

``entry_gradients=auto`` picks per tensor: sampled where the tensor's density K_i / numel is below
:data:`SAMPLED_BELOW`, dense otherwise. The threshold is measured, not derived: torch's CPU SDDMM is
memory-bound, so at mBERT-base's shapes (768x768, 3072x768, 768x3072) and 2,048 tokens (2 CPU
cores, torch 2.13) it cost 0.4-0.5x the dense product at 0.5% density and 0.4-0.8x at 2%, but
0.95-1.6x at 4.3% (LT-SFT's K) and more above (``benchmarks/sft_entry_gradients.py``; a GPU will
differ: re-measure there; ``benchmarks/sft_memory.py`` times whole steps with each path). The
choice is a function of the config and the mask only, so a resumed run takes the same path and
stays bit-identical.

Growth statistics of the dynamic delta (:mod:`.dynamic`) need more than the entries: RigL's
candidates are the largest |gradient| over the whole tensor (one micro-batch per window) and SM3
updates row/column maxima of the squared gradient (every micro-batch). Those are computed from the
same factors, row block by row block over the sum of every tap of the tensor (a tied embedding's
decoder and input contributions together), once the tensor's last tap of the micro-batch has run.

Assumption: a tapped weight is read only through its modules' ``forward`` (true of every
architecture in :data:`xlpeft.models.ARCHITECTURES`; ``tests/methods/test_sft_taps.py`` checks the
gradients against autograd's on each). Anything else in the delta (biases, LayerNorms, an
``nn.Embedding`` with ``max_norm`` or ``scale_grad_by_freq``) keeps the autograd path.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import nn

from xlpeft.recompute import recomputing

SAMPLED_BELOW = 0.02  # density below which the SDDMM is used (see the module docstring for the measurement)
CHUNK = 1 << 22  # entries of a dense gradient block computed at once: 16 MiB in fp32
ENTRY_GRADIENTS = ("auto", "sampled", "dense", "autograd")


class Entries:
    """A weight's entries sorted by flat index, as CSR: row pointers, columns and the slot of each.

    4-12 bytes per entry (int32 columns, slots unless the indices are sorted already, as LT-SFT's
    are, and flat indices for weights of more than one block) plus the row pointers, beside the
    trainable's own 16 (index, value, theta0 at the index); rebuilt only after a reselection. A
    weight of one block (every Linear of a base-size encoder) is gathered densely in slot order
    straight from the trainable's index vector, as the autograd path does.
    """

    def __init__(self, idx: torch.Tensor, shape: tuple[int, int]) -> None:
        rows, cols = shape
        ordered = bool((idx[1:] > idx[:-1]).all()) if len(idx) > 1 else True
        index_dtype = torch.int32 if rows * cols < 2**31 else torch.long
        order = None if ordered else torch.argsort(idx)
        flat = idx if order is None else idx[order]  # (K,) ascending
        row = torch.div(flat, cols, rounding_mode="floor")
        self.order = None if order is None else order.to(index_dtype)  # (K,) sorted position -> slot
        self.cols = (flat - row * cols).to(index_dtype)  # (K,)
        self.slots_flat = idx if rows * cols <= CHUNK else None  # one block: gather in slot order, no sort
        self.flat = flat.to(index_dtype) if self.slots_flat is None else None  # (K,) for block-local offsets
        crow = torch.zeros(rows + 1, dtype=torch.long, device=idx.device)
        crow[1:] = torch.bincount(row, minlength=rows).cumsum(0)
        self.crow = crow  # (rows + 1,)
        self.bounds = crow.tolist()  # host copy: block boundaries without a device sync per block
        self.shape = shape

    def __len__(self) -> int:
        return len(self.cols)

    def block_csr(self, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` as a (r1 - r0, cols) CSR pattern (zeros), for the SDDMM."""
        s, t = self.bounds[r0], self.bounds[r1]
        crow = (self.crow[r0:r1 + 1] - s).to(self.cols.dtype)
        zeros = torch.zeros(t - s, device=self.cols.device)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the SDDMM is what is used of it
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(crow, self.cols[s:t], zeros, size=(r1 - r0, self.shape[1]))

    def to_slots(self, sorted_values: torch.Tensor) -> torch.Tensor:
        if self.order is None:
            return sorted_values
        out = torch.empty_like(sorted_values)
        out[self.order] = sorted_values
        return out


def row_blocks(rows: int, cols: int) -> Iterator[tuple[int, int]]:
    step = max(1, CHUNK // max(cols, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


class LinearPart:
    """One Linear tap's factors: the weight gradient is ``dy^T x`` (rows = out features, cols = in features)."""

    def __init__(self, dy: torch.Tensor, x: torch.Tensor) -> None:
        self.dy, self.x = dy, x  # (T, rows), (T, cols)

    def block(self, r0: int, r1: int) -> torch.Tensor:
        return self.dy[:, r0:r1].t() @ self.x  # (r1 - r0, cols)

    def at(self, e: Entries, sampled: bool) -> torch.Tensor:
        """The gradient at ``e``'s entries, in slot order (K,), row block by row block (bounded temporaries)."""
        if not sampled and e.slots_flat is not None:  # the whole weight is one block: gather it in slot order
            return self.block(0, e.shape[0]).reshape(-1)[e.slots_flat]
        vals = torch.empty(len(e), dtype=self.x.dtype, device=self.x.device)
        cols = e.shape[1]
        for r0, r1 in row_blocks(*e.shape):
            s, t = e.bounds[r0], e.bounds[r1]
            if s == t:
                continue
            if sampled:  # SDDMM: dy[:, r0:r1]^T x at the block's entries only
                dy = self.dy[:, r0:r1].t().contiguous()  # (r1 - r0, T)
                vals[s:t] = torch.sparse.sampled_addmm(e.block_csr(r0, r1), dy, self.x, beta=0.0).values()
            else:
                vals[s:t] = self.block(r0, r1).reshape(-1)[e.flat[s:t] - r0 * cols]
        return e.to_slots(vals)


class EmbeddingPart:
    """One Embedding tap's gradient, row-sparse: the distinct tokens ``rows`` (u,) and their summed gradients (u, H)."""

    def __init__(self, ids: torch.Tensor, dy: torch.Tensor, padding_idx: int | None) -> None:
        if padding_idx is not None:  # nn.Embedding gives the padding row no gradient
            keep = ids != padding_idx
            ids, dy = ids[keep], dy[keep]
        self.rows, inverse = torch.unique(ids, return_inverse=True)  # (u,) ascending
        self.grad = torch.zeros(len(self.rows), dy.shape[1], dtype=dy.dtype, device=dy.device).index_add_(0, inverse, dy)

    def block(self, r0: int, r1: int) -> torch.Tensor:
        a, b = (int(i) for i in torch.searchsorted(self.rows, torch.tensor([r0, r1], device=self.rows.device)))
        out = torch.zeros(r1 - r0, self.grad.shape[1], dtype=self.grad.dtype, device=self.grad.device)
        out[self.rows[a:b] - r0] = self.grad[a:b]
        return out

    def at(self, e: Entries, sampled: bool = True) -> torch.Tensor:
        starts = e.crow[self.rows]  # (u,) first entry of each batch row
        lengths = e.crow[self.rows + 1] - starts  # (u,) entries in that row
        n = int(lengths.sum())
        out = torch.zeros(len(e), dtype=self.grad.dtype, device=self.grad.device)
        if n:
            which = torch.repeat_interleave(torch.arange(len(self.rows), device=lengths.device), lengths)  # (n,)
            offset = torch.arange(n, device=lengths.device) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
            pos = starts[which] + offset  # (n,) sorted positions of the entries in the batch's rows
            slots = pos if e.order is None else e.order[pos]
            out[slots] = self.grad[which, e.cols[pos]]
        return out


def _linear_part(w: TappedWeight, dy: torch.Tensor, x: torch.Tensor) -> LinearPart:
    return LinearPart(dy.reshape(-1, dy.shape[-1]).float(), x.reshape(-1, x.shape[-1]).float())  # (T, rows), (T, cols)


def _embedding_part(w: TappedWeight, dy: torch.Tensor, ids: torch.Tensor) -> EmbeddingPart:
    return EmbeddingPart(ids.reshape(-1), dy.reshape(-1, dy.shape[-1]).float(), w.padding_idx)  # (T,), (T, H)


class _Tap(torch.autograd.Function):
    """Identity on a module's output ``y``; its backward hands ``dy`` (and the module's input) to the weight's
    taps and returns the gradient at the entries as ``values``' gradient."""

    @staticmethod
    def forward(ctx, y, inp, values, weight, make_part):
        ctx.save_for_backward(inp)
        ctx.weight, ctx.make_part = weight, make_part
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        (inp,) = ctx.saved_tensors
        w = ctx.weight
        return dy, None, w.contribute(ctx.make_part(w, dy, inp)).to(w.param.dtype), None, None


class TappedWeight:
    """One weight of the delta read through taps: its entries, per-micro-batch growth statistics, its hooks."""

    def __init__(self, name: str, param: nn.Parameter, owner, sampled: bool, padding_idx: int | None) -> None:
        self.name, self.param, self.owner = name, param, owner
        self.shape = (param.shape[0], param.shape[1])
        self.sampled, self.padding_idx = sampled, padding_idx
        self.uses = 0  # taps run in this micro-batch's forward whose backward has not come yet
        self.parts: list = []  # factors kept for the whole-tensor statistics (selector "dense")
        self.cand_grad: torch.Tensor | None = None  # the gradient at the rigl candidates, summed over taps
        self._entries: tuple[int, Entries] | None = None  # (version, entries of the delta)
        self._cand: tuple[torch.Tensor, Entries] | None = None  # (candidate idx object, its entries)

    def entries(self) -> Entries:
        version = self.owner.version()
        if self._entries is None or self._entries[0] != version:
            self._entries = (version, Entries(self.owner.t.indices[self.name], self.shape))
        return self._entries[1]

    def contribute(self, part) -> torch.Tensor:
        """One tap's backward: the gradient at the delta's entries (slot order); growth statistics on the side."""
        selector = self.owner.t.selector
        need = selector.need(self.name) if selector is not None else None
        if need == "dense":
            self.parts.append(part)
        elif need == "candidates":
            cand = selector.candidates[self.name][0]
            if self._cand is None or self._cand[0] is not cand:
                self._cand = (cand, Entries(cand, self.shape))
            g = part.at(self._cand[1], self.sampled)
            self.cand_grad = g if self.cand_grad is None else self.cand_grad + g
        grad = part.at(self.entries(), self.sampled)
        self.uses -= 1
        if self.uses <= 0:
            self.finish()
        return grad

    def finish(self) -> None:
        """The tensor's micro-batch gradient is complete: hand the statistics to the selector."""
        selector = self.owner.t.selector
        if self.parts:
            parts = self.parts
            rows, cols = self.shape

            def blocks():
                for r0, r1 in row_blocks(rows, cols):
                    total = parts[0].block(r0, r1)
                    for part in parts[1:]:
                        total = total + part.block(r0, r1)
                    yield r0, total  # (r1 - r0, cols)
            selector.observe_blocks(self.name, blocks, self.shape)
        if self.cand_grad is not None:
            selector.add_candidates(self.name, self.cand_grad)
        self.reset()

    def reset(self) -> None:
        self.uses, self.parts, self.cand_grad = 0, [], None


class EntryTaps:
    """The taps of one sparse phase: which weights they cover, their hooks, the version of the mask."""

    def __init__(self, trainable, mode: str) -> None:
        self.t, self.mode = trainable, mode
        self.weights: dict[str, TappedWeight] = {}
        self._handles: list = []

    def version(self) -> int:
        return self.t.selector.reselections if self.t.selector is not None else 0

    def install(self, model: nn.Module, names: list[str]) -> set[str]:
        """Tap every weight of ``names`` that is read only by Linear / plain Embedding modules; the names tapped."""
        users: dict[int, list[nn.Module]] = {}
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor):
                users.setdefault(id(weight), []).append(module)
        tapped: set[str] = set()
        for name in names:
            p = self.t.params[name]
            mods = users.get(id(p), [])
            if p.dim() != 2 or not mods or not all(_tappable(m) for m in mods):
                continue
            density = len(self.t.indices[name]) / p.numel()
            sampled = self.mode == "sampled" or (self.mode == "auto" and density < SAMPLED_BELOW)
            emb = next((m for m in mods if isinstance(m, nn.Embedding)), None)
            w = TappedWeight(name, p, self, sampled, emb.padding_idx if emb is not None else None)
            self.weights[name] = w
            for m in mods:
                make_part = _linear_part if isinstance(m, nn.Linear) else _embedding_part
                self._handles.append(m.register_forward_hook(partial(_hook, w, self._values(name), make_part),
                                                             prepend=True))
            tapped.add(name)
        return tapped

    def _values(self, name: str) -> Callable[[], nn.Parameter]:
        return lambda: self.t.values[name]

    def counts(self) -> dict[str, float]:
        sampled = sum(w.sampled for w in self.weights.values())
        return {"tapped_sampled_tensors": float(sampled), "tapped_dense_tensors": float(len(self.weights) - sampled)}

    def after_step(self) -> None:
        for w in self.weights.values():  # a forward without a backward leaves nothing behind
            w.reset()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.weights.clear()


def _tappable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq
            and not module.sparse)


def _hook(w: TappedWeight, values: Callable[[], nn.Parameter], make_part, module, args, output):
    if not torch.is_grad_enabled():
        return None
    if not recomputing():  # a checkpointed layer's recomputation has no backward of its own to pair with
        w.uses += 1
    return _Tap.apply(output, args[0], values(), w, make_part)
