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

    # ---- per micro-batch: called from the trainable's gradient hook while the dense gradient exists
    @torch.no_grad()
    def observe(self, name: str, grad: torch.Tensor) -> None:
        if self.growth == "sm3":
            self._sm3(name, grad.float())
        elif self.accumulating:
            flat = grad.reshape(-1).float()
            if name not in self.candidates:
                k = len(self.t.indices[name])
                idx = torch.topk(flat.abs(), k, sorted=False).indices  # (K_i,)
                g = flat[idx]
                self.candidates[name] = (idx, g.clone(), g * g, torch.ones_like(g))
            else:
                idx, gsum, gsq, samples = self.candidates[name]
                g = flat[idx]
                gsum += g
                gsq.addcmul_(g, g)
                samples += 1

    def _sm3(self, name: str, g: torch.Tensor) -> None:
        """SM3 (Anil et al. 2019): nu = min(row_i, col_j) + g^2; rows, cols = the max of nu over columns, rows."""
        sq = g * g
        if g.dim() != 2:
            acc = self.rows.get(name)
            self.rows[name] = sq.reshape(-1) if acc is None else acc + sq.reshape(-1)
            return
        if name not in self.rows:
            self.rows[name] = torch.zeros(g.shape[0], device=g.device)
            self.cols[name] = torch.zeros(g.shape[1], device=g.device)
        nu = torch.minimum(self.rows[name][:, None], self.cols[name][None, :]) + sq  # (rows, cols), transient
        self.rows[name] = nu.amax(1)
        self.cols[name] = nu.amax(0)

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
        score = rows.clone() if name not in self.cols else torch.outer(rows, self.cols[name]).reshape(-1)  # (numel,)
        score[current] = -1.0  # scores are >= 0: an entry of the delta is never grown again
        return torch.topk(score, n, sorted=True).indices, None

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
