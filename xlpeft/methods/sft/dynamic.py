"""Dynamic sparse fine-tuning without a dense phase (SpIEL; Ansell et al. 2024, "Scaling Sparse Fine-Tuning
to Large Language Models").

The delta keeps K entries at every step: per tensor an index vector and a value vector of fixed
length K_i (K split over the tensors in proportion to their size, as SpIEL's per-module density).
Training starts from a random subset and periodically *drops* the entries whose delta is smallest
in magnitude and *grows* new ones where the loss wants them:

* ``rigl`` (SpIEL's default): gradients are accumulated over ``accumulation_steps`` steps before a
  reselection, at a candidate set of K_i entries per tensor (the largest |gradient| of the window's
  first micro-batch), so what is held is O(K); new entries are the candidates with the largest
  |accumulated gradient|, and their AdamW moments are seeded with the window's mean gradient and
  mean squared gradient (SpIEL's ``update_optimizer``);
* ``sm3``: SM3-style row and column accumulators of squared gradients (Anil et al. 2019) are kept
  for the whole run, O(rows + columns) per matrix, and new entries are the largest entries of
  their outer product; grown entries start with zero moments, as SpIEL's SM3 path does.

The schedule is SpIEL's (``src/peft/tuners/sft/trainer.py`` of AlanAnsell/peft): a window opens at
the start and after every step ``c`` with ``(c + 1) % reselect_every == 0``; a reselection follows
step ``c`` with ``c % reselect_every == accumulation_steps``. The fraction replaced is 1 at the first
reselection (the random start is a placeholder) and then ``rate * (1 - c / T)`` (linear) or
``rate * (1 + cos(pi c / T)) / 2`` (cosine). An entry both dropped and grown stays as it is.

Known difference: SpIEL's AdamW keeps a per-entry step count ("age") for Adam's bias correction;
torch's AdamW has one per tensor. A grown entry's moments are therefore seeded as
``mean_g * (1 - beta1**t)`` and ``mean_g2 * (1 - beta2**t)`` with the tensor's step count ``t``, so that
after bias correction they equal the window's mean gradient and mean squared gradient, which is what
SpIEL's seeding achieves with its ages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from xlpeft.errors import XlpeftError
from xlpeft.methods.sft.taps import row_blocks


def allocate(numels: Mapping[str, int], k: int) -> dict[str, int]:
    """K split over tensors in proportion to their sizes, exactly ``k`` in total (largest remainders first)."""
    total = sum(numels.values())
    if not 0 < k <= total:
        raise XlpeftError(f"dynamic sft: K should be in 1..{total} (the maskable entries); got {k}")
    shares = {n: k * m / total for n, m in numels.items()}
    counts = {n: int(s) for n, s in shares.items()}
    left = k - sum(counts.values())
    by_remainder = sorted(numels, key=lambda n: counts[n] - shares[n])  # stable: ties keep tensor order
    for name in by_remainder[:left]:
        counts[name] += 1
    return counts


def random_subset(numel: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct flat indices in ``[0, numel)``, ascending, in O(k) memory (no permutation of ``numel``)."""
    if k >= numel:
        return torch.arange(numel)
    if 4 * k >= numel:  # dense enough that a permutation is cheap and exact
        return torch.sort(torch.randperm(numel, generator=generator)[:k]).values
    chosen = torch.zeros(0, dtype=torch.long)
    while len(chosen) < k:
        draw = torch.randint(numel, (k - len(chosen) + k // 8 + 16,), generator=generator)
        chosen = torch.unique(torch.cat([chosen, draw]))  # sorted, distinct
    keep = torch.randperm(len(chosen), generator=generator)[:k]
    return torch.sort(chosen[keep]).values


def holds(group: Mapping, param: torch.Tensor) -> bool:
    """Whether an optimizer parameter group trains ``param`` (by identity: tensors compare elementwise)."""
    return any(p is param for p in group["params"])


def _same_on_every_rank(grow, seeds, seeded: bool, device):
    """Data parallel: every rank takes rank 0's growth, so all keep one mask (the drop already agrees:
    the values are synchronised). The growth statistics are thus rank 0's micro-batches'."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return grow, seeds
    count = torch.tensor([-1 if grow is None else len(grow)], device=device)
    dist.broadcast(count, 0)
    n = int(count)
    if n < 0:
        return None, None
    grow = grow if dist.get_rank() == 0 else torch.zeros(n, dtype=torch.long, device=device)
    dist.broadcast(grow, 0)
    if seeded:
        if dist.get_rank() == 0:
            seeds = tuple(s.contiguous() for s in seeds)
        else:
            seeds = (torch.zeros(n, device=device), torch.zeros(n, device=device))
        for s in seeds:
            dist.broadcast(s, 0)
    return grow, seeds


def top_blocks(blocks, k: int, cols: int, absolute: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries (by |value| if ``absolute``) of a matrix given as row blocks: (flat idx, value).

    Exact, with O(k + block) memory, so no dense copy of a 92M-entry matrix is ever made: a block's
    entries enter the pool only above the pool's k-th key, and the pool is cut back to k when it doubles."""
    key = torch.abs if absolute else (lambda t: t)
    pool_i: torch.Tensor | None = None
    pool_g: torch.Tensor | None = None
    for r0, block in blocks:
        flat = block.reshape(-1)
        offset = r0 * cols
        if pool_g is not None and len(pool_g) >= k:
            threshold = key(pool_g).min()
            keep = (key(flat) > threshold).nonzero().squeeze(1)
            new_i, new_g = keep + offset, flat[keep]
        else:
            new_i = torch.arange(offset, offset + len(flat), device=flat.device)
            new_g = flat
        pool_i = new_i if pool_i is None else torch.cat([pool_i, new_i])
        pool_g = new_g.clone() if pool_g is None else torch.cat([pool_g, new_g])
        if len(pool_g) >= 2 * k:
            best = torch.topk(key(pool_g), k, sorted=False).indices
            pool_i, pool_g = pool_i[best], pool_g[best]
    if len(pool_g) > k:
        best = torch.topk(key(pool_g), k, sorted=False).indices
        pool_i, pool_g = pool_i[best], pool_g[best]
    return pool_i, pool_g


class DynamicSelector:
    """SpIEL's drop-and-grow over the trainable's ``indices`` / ``values`` / ``base_values`` (changed in place)."""

    def __init__(self, trainable, growth: str, reselect_every: int, accumulation_steps: int,
                 rate: float, policy: str, total_steps: int) -> None:
        self.t = trainable
        self.growth, self.every, self.window = growth, reselect_every, accumulation_steps
        self.rate, self.policy, self.total = rate, policy, total_steps
        self.optimizer: torch.optim.Optimizer | None = None
        self.accumulating = growth == "rigl"  # SpIEL opens the first window at the start
        # rigl: name -> (candidate flat indices (K_i,), summed gradients (K_i,), summed squares (K_i,), micro-batches)
        self.candidates: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # sm3: name -> row accumulator (rows,) and column accumulator (cols,); 1-D tensors keep one of their size
        self.rows: dict[str, torch.Tensor] = {}
        self.cols: dict[str, torch.Tensor] = {}
        self.reselections = 0
        self.replaced = 0

    # ---- per micro-batch, from the trainable's gradient hook (autograd path) or its taps (:mod:`.taps`)
    def need(self, name: str) -> str | None:
        """What this micro-batch's gradient of ``name`` is needed for: "dense" (the whole tensor: rigl's first
        micro-batch of a window, every sm3 micro-batch), "candidates" (rigl, at the window's candidates) or None."""
        if self.growth == "sm3":
            return "dense"
        if not self.accumulating:
            return None
        return "candidates" if name in self.candidates else "dense"

    @torch.no_grad()
    def observe(self, name: str, grad: torch.Tensor) -> None:
        """The autograd path: ``grad`` is the dense gradient of one micro-batch."""
        need = self.need(name)
        if need == "candidates":
            self.add_candidates(name, grad.reshape(-1).float()[self.candidates[name][0]])
        elif need == "dense":
            shape = tuple(grad.shape) if grad.dim() == 2 else (1, grad.numel())
            self.observe_blocks(name, lambda: iter([(0, grad.reshape(shape).float())]), shape, vector=grad.dim() != 2)

    @torch.no_grad()
    def observe_blocks(self, name: str, blocks, shape: tuple[int, int], vector: bool = False) -> None:
        """The whole micro-batch gradient of ``name``: ``blocks()`` yields ``(first row, (rows, cols) block)``
        covering every row; ``vector``: a 1-D parameter, presented as one row."""
        if self.growth == "sm3":
            self._sm3(name, blocks, shape, vector)
        else:
            idx, g = top_blocks(blocks(), len(self.t.indices[name]), shape[1])
            self.candidates[name] = (idx, g.clone(), g * g, torch.ones_like(g))

    @torch.no_grad()
    def add_candidates(self, name: str, g: torch.Tensor) -> None:
        """One more micro-batch of the window: ``g`` (K_i,) is its gradient at the candidates."""
        idx, gsum, gsq, samples = self.candidates[name]
        gsum += g
        gsq.addcmul_(g, g)
        samples += 1

    def _sm3(self, name: str, blocks, shape: tuple[int, int], vector: bool) -> None:
        """SM3 (Anil et al. 2019): nu = min(row_i, col_j) + g^2; rows, cols = the max of nu over columns, rows.

        A vector (bias) keeps one accumulator of its size (its blocks are one row)."""
        if vector:
            sq = next(iter(blocks()))[1].reshape(-1) ** 2
            acc = self.rows.get(name)
            self.rows[name] = sq if acc is None else acc + sq
            return
        rows, cols = self.rows.get(name), self.cols.get(name)
        new_rows, new_cols = None, None
        for r0, g in blocks():
            sq = g * g  # (r, cols)
            if rows is None:
                nu = sq
            else:
                nu = torch.minimum(rows[r0:r0 + len(g), None], cols[None, :]) + sq  # (r, cols), transient
            if new_rows is None:
                new_rows = torch.zeros(shape[0], device=g.device)
                new_cols = torch.zeros(shape[1], device=g.device)
            new_rows[r0:r0 + len(g)] = nu.amax(1)
            torch.maximum(new_cols, nu.amax(0), out=new_cols)
        self.rows[name], self.cols[name] = new_rows, new_cols

    # ---- per optimizer step
    def after_step(self, step: int) -> None:
        """SpIEL's selector step: close a window with a reselection, or open the next one."""
        if step % self.every == self.window and (self.growth == "sm3" or self.candidates) and step <= self.total:
            self.reselect(self.fraction(step))
            self.accumulating = False
            self.candidates = {}
        if self.growth == "rigl" and (step + 1) % self.every == 0:
            self.accumulating = True
            self.candidates = {}

    def fraction(self, step: int) -> float:
        if self.policy == "linear":
            return 1.0 if step == self.window else self.rate * (1 - step / self.total)
        return self.rate * (1 + math.cos(math.pi * step / self.total)) / 2

    @torch.no_grad()
    def reselect(self, fraction: float) -> None:
        t = self.t
        for name in list(t.indices):
            values = t.values[name]
            n_change = int(len(values) * fraction)
            if n_change == 0:
                continue
            idx = t.indices[name]
            drop = torch.topk(values.detach().abs(), n_change, largest=False, sorted=True).indices  # slots, smallest first
            dropped_flat = idx[drop]
            stays = torch.ones(len(idx), dtype=torch.bool, device=idx.device)
            stays[drop] = False
            remaining = idx[stays]
            grow, seeds = self._growth(name, n_change, remaining)
            grow, seeds = _same_on_every_rank(grow, seeds, self.growth == "rigl", idx.device)
            if grow is None:
                continue
            # an entry both dropped and grown stays as it is (value and moments kept): out of both lists
            regrown = torch.isin(grow, dropped_flat)
            drop = drop[~torch.isin(dropped_flat, grow[regrown])]
            grow = grow[~regrown]
            m = min(len(drop), len(grow))  # SpIEL: the smallest entries go first, the best candidates come first
            drop, grow = drop[:m], grow[:m]
            if seeds is not None:
                seeds = tuple(s[~regrown][:m] for s in seeds)
            if not len(drop):
                continue
            weight = t.params[name].view(-1)
            weight.index_copy_(0, idx[drop], t._base_values[name][drop])  # dropped entries: exactly theta0
            idx[drop] = grow.to(idx.dtype)
            t._base_values[name][drop] = weight[grow]  # never written, so theta0
            values[drop] = 0.0
            self._seed_moments(values, drop, seeds)
            self.replaced += len(drop)
        self.reselections += 1

    def _growth(self, name: str, n: int, remaining: torch.Tensor):
        """(flat indices to grow, best first, at most ``n``; rigl's moment seeds).

        rigl ranks the candidates not in ``remaining`` (those just dropped may come back, as in SpIEL);
        sm3 ranks every entry not in the delta before the drop, as SpIEL's ``select_sm3`` does.
        """
        current = self.t.indices[name]
        if self.growth == "rigl":
            if name not in self.candidates:
                return None, None  # never reached by the loss in this window
            cand, gsum, gsq, samples = self.candidates[name]
            free = ~torch.isin(cand, remaining)
            cand, gsum, gsq, samples = cand[free], gsum[free], gsq[free], samples[free]
            best = torch.topk(gsum.abs(), min(n, len(cand)), sorted=True).indices
            return cand[best], (gsum[best] / samples[best], gsq[best] / samples[best])
        rows = self.rows.get(name)
        if rows is None:
            return None, None
        if name not in self.cols:  # a vector
            score = rows.clone()
            score[current] = -1.0  # scores are >= 0: an entry of the delta is never grown again
            return torch.topk(score, n, sorted=True).indices, None
        cols = self.cols[name]
        taken = torch.sort(current).values

        def blocks():  # the outer product row block by row block: never the whole (rows, cols) matrix
            for r0, r1 in row_blocks(len(rows), len(cols)):
                score = torch.outer(rows[r0:r1], cols)  # (r1 - r0, cols)
                lo, hi = torch.searchsorted(taken, torch.tensor([r0 * len(cols), r1 * len(cols)], device=taken.device)).tolist()
                score.view(-1)[taken[lo:hi] - r0 * len(cols)] = -1.0
                yield r0, score
        idx, score = top_blocks(blocks(), n, len(cols), absolute=False)
        return idx[torch.argsort(score, descending=True, stable=True)], None

    def _seed_moments(self, values: nn.Parameter, slots: torch.Tensor, seeds) -> None:
        if self.optimizer is None:
            return
        state = self.optimizer.state.get(values)
        if not state:
            return
        if seeds is None:  # sm3: fresh entries start from zero moments
            state["exp_avg"][slots] = 0.0
            state["exp_avg_sq"][slots] = 0.0
            return
        beta1, beta2 = next(g["betas"] for g in self.optimizer.param_groups if holds(g, values))
        steps = float(state["step"])
        mean_g, mean_g2 = seeds
        state["exp_avg"][slots] = (mean_g * (1 - beta1 ** steps)).to(state["exp_avg"].dtype)
        state["exp_avg_sq"][slots] = (mean_g2 * (1 - beta2 ** steps)).to(state["exp_avg_sq"].dtype)

    # ---- exact resume
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"selector.flags": torch.tensor([int(self.accumulating), self.reselections, self.replaced])}
        for name, parts in self.candidates.items():
            for key, tensor in zip(("idx", "sum", "sq", "n"), parts, strict=True):
                out[f"selector.cand.{key}.{name}"] = tensor
        out.update({f"selector.rows.{n}": r for n, r in self.rows.items()})
        out.update({f"selector.cols.{n}": c for n, c in self.cols.items()})
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor], device: torch.device) -> None:
        flags = state.get("selector.flags")
        if flags is None:
            raise XlpeftError("dynamic sft: the checkpoint holds no selector state; it was not written by a dynamic run")
        self.accumulating, self.reselections, self.replaced = bool(flags[0]), int(flags[1]), int(flags[2])
        names = {k[len("selector.cand.idx."):] for k in state if k.startswith("selector.cand.idx.")}
        self.candidates = {n: tuple(state[f"selector.cand.{key}.{n}"].to(device).clone() for key in ("idx", "sum", "sq", "n"))
                           for n in names}
        self.rows = {k[len("selector.rows."):]: v.to(device).clone() for k, v in state.items() if k.startswith("selector.rows.")}
        self.cols = {k[len("selector.cols."):]: v.to(device).clone() for k, v in state.items() if k.startswith("selector.cols.")}
