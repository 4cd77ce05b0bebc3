"""Choosing the K entries of a sparse delta: a streamed, exact, deterministic top-K over many tensors.

LT-SFT's reference code gathers every |delta| of the model into one Python list to find the
threshold (hundreds of millions of floats for mBERT). Here scores are produced one tensor at a
time by a callable and never concatenated:

1. sample: about ``sample_size`` scores drawn uniformly across tensors give a threshold ``lo``
   a little below the K-th largest score (a rank with 5% slack);
2. count: one pass counts the scores > ``lo`` and >= ``lo``; if fewer than K reach ``lo``, it is
   lowered and the pass repeated;
3. exact refinement, holding O(K) entries at most:
   * fewer than K scores exceed ``lo``: the K-th largest *is* ``lo``, so the result is every
     entry above it plus the first entries equal to it (the common case when many scores tie,
     e.g. the zero |delta| of never-seen embedding rows);
   * otherwise the ~1.05 K entries above ``lo`` are gathered with their flat indices, the K-th
     largest ``v`` among them is found with ``kthvalue``, and the entries above ``v`` plus the
     first ones equal to ``v`` are kept.

"First" is in (tensor order, flat index) order, so exactly K entries are kept and ties are
broken deterministically.

The result equals a dense reference: concatenate all scores in tensor order, stable-sort them
descending, take the first K (``tests/methods/test_sft.py`` checks this).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from xlpeft.errors import XlpeftError

Scores = Callable[[str], torch.Tensor]  # tensor name -> scores of its entries (any shape, numel as declared)


def _sample(numels: Mapping[str, int], score: Scores, sample_size: int, generator: torch.Generator) -> torch.Tensor:
    """About ``sample_size`` scores, drawn per tensor in proportion to its size (all of them if fewer)."""
    total = sum(numels.values())
    parts = []
    for name, n in numels.items():
        flat = score(name).reshape(-1)
        if total <= sample_size:
            parts.append(flat.float())
            continue
        m = max(1, math.ceil(sample_size * n / total))
        picks = torch.randint(n, (m,), generator=generator).to(flat.device)
        parts.append(flat[picks].float())
    return torch.cat(parts).cpu()  # (S,)


def _count(numels: Mapping[str, int], score: Scores, lo: float) -> tuple[int, int]:
    """(scores > ``lo``, scores >= ``lo``) over all tensors, storing nothing."""
    above = reached = 0
    for name in numels:
        flat = score(name).reshape(-1)
        above += int(torch.count_nonzero(flat > lo))  # not .sum(): that widens the mask to int64 first
        reached += int(torch.count_nonzero(flat >= lo))
    return above, reached


def _above(numels: Mapping[str, int], score: Scores, lo: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per tensor, (flat indices ascending, scores) of the entries scoring > ``lo``."""
    out = {}
    for name in numels:
        flat = score(name).reshape(-1)
        idx = torch.nonzero(flat > lo).squeeze(1)  # (c,) ascending
        out[name] = (idx, flat[idx].float())
    return out


def _first_equal(flat: torch.Tensor, value: float, limit: int, chunk: int = 1 << 22) -> torch.Tensor:
    """Flat indices of the first ``limit`` entries equal to ``value``, scanning in chunks (bounded memory)."""
    found = []
    for start in range(0, len(flat), chunk):
        if limit <= 0:
            break
        hits = torch.nonzero(flat[start:start + chunk] == value).squeeze(1)[:limit] + start
        found.append(hits)
        limit -= len(hits)
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.long, device=flat.device)


def _keep(parts, threshold: float, ties: int) -> dict[str, torch.Tensor]:
    """Entries scoring > ``threshold``, plus the first ``ties`` scoring == ``threshold`` in tensor order.

    ``parts`` yields (name, flat scores, their flat indices or None for all of them) tensor by tensor.
    """
    out = {}
    for name, vals, idx in parts:
        tied = _first_equal(vals, threshold, ties)
        ties -= len(tied)
        above = torch.nonzero(vals > threshold).squeeze(1)
        if idx is not None:  # vals are a gathered subset: map positions back to flat indices
            above, tied = idx[above], idx[tied]
        out[name] = torch.sort(torch.cat([above, tied])).values.cpu()
    return out


def top_k_indices(
    numels: Mapping[str, int],
    score: Scores,
    k: int,
    *,
    sample_size: int = 1 << 20,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The flat indices of the ``k`` highest-scoring entries over all tensors, exactly ``k`` in total.

    Args:
        numels: tensor name -> number of entries, in the order that breaks ties (earlier first).
        score: tensor name -> its scores; called a few times per tensor, must return the same values.
        k: entries to keep; ``k >= total`` keeps everything.
        sample_size: scores sampled to estimate the threshold (what is held at once is O(k)).
        generator: for the sample (the result does not depend on it, only the work done).

    Returns:
        name -> 1-D int64 tensor of ascending flat indices, for every tensor (possibly empty).
    """
    total = sum(numels.values())
    if k >= total:
        return {name: torch.arange(n) for name, n in numels.items()}
    if k <= 0:
        return {name: torch.zeros(0, dtype=torch.long) for name in numels}
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    sample = _sample(numels, score, sample_size, generator)
    s = len(sample)
    rank = k if s == total else min(s, math.ceil(1.05 * k * s / total) + 16)  # slack for sampling error
    while True:
        lo = float("-inf") if rank >= s else float(torch.topk(sample, rank).values[-1])
        above, reached = _count(numels, score, lo)
        if reached >= k:
            break
        if rank >= s:
            raise XlpeftError(f"only {reached} of {total} scores are comparable (NaN scores?); cannot keep {k}")
        rank = min(s, 2 * rank)  # the sample overestimated the threshold: lower it
    if above < k:  # the k-th largest score is lo itself
        return _keep(((name, score(name).reshape(-1), None) for name in numels), lo, k - above)
    cands = _above(numels, score, lo)  # ~1.05 k entries
    values = torch.cat([v for _, v in cands.values()]).cpu()  # (above,)
    kth = float(torch.kthvalue(values, above - k + 1).values)  # the k-th largest score
    return _keep(((n, v, i) for n, (i, v) in cands.items()), kth, k - int(torch.count_nonzero(values > kth)))


def random_scores(numel: int, seed: int, position: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform scores for the ``position``-th tensor, the same on every call (a uniformly random K-subset)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + position)
    return torch.rand(numel, generator=gen).to(device)


class MovementScores:
    """Movement-pruning scores accumulated during phase 1 (Sanh et al., NeurIPS 2020), in two variants.

    * ``paper`` (default): Sanh et al.'s S = -sum_t g_t * theta_t, with theta_t the weights at which
      the step-t gradient g_t was computed, so :meth:`before_step` must run after the backward pass
      and before the optimizer changes the weights. Large when the optimiser keeps pushing a weight
      away from zero.
    * ``delta``: the same rule for the *delta*, whose value should grow away from zero:
      S <- S - g_t * (theta_{t+1} - theta0), with theta_{t+1} the weights just after step t
      (:meth:`after_step`). An entry scores high when its gradient keeps agreeing with the direction
      it has already moved; one that travelled far and is being pulled back scores low.

    g_t is the step's accumulated (and clipped, when clipping is on) gradient, L1 included.
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter], theta0: Mapping[str, torch.Tensor],
                 kind: str = "paper") -> None:
        if kind not in ("paper", "delta"):
            raise XlpeftError(f"movement should be paper or delta; got {kind!r}")
        self.params, self.theta0, self.kind = params, theta0, kind
        self.scores = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}

    @torch.no_grad()
    def before_step(self) -> None:
        """``paper``: S -= g * theta, at the weights the gradient was taken at."""
        if self.kind != "paper":
            return
        for name, p in self.params.items():
            if p.grad is not None:  # None: not reached by the loss this step
                self.scores[name].addcmul_(p.grad.float(), p.float(), value=-1.0)

    @torch.no_grad()
    def after_step(self) -> None:
        """``delta``: S -= g * (theta_after - theta0), without a temporary of the size of the tensor."""
        if self.kind != "delta":
            return
        for name, p in self.params.items():
            if p.grad is None:
                continue
            g = p.grad.float()
            self.scores[name].addcmul_(g, p.float(), value=-1.0).addcmul_(g, self.theta0[name].float())

    def __call__(self, name: str) -> torch.Tensor:
        return self.scores[name]
