"""Training an LT-SFT through the :class:`~xlpeft.methods.base.Trainable` protocol, and activating a saved one.

Phase 1 ("full") fine-tunes every maskable weight in place, keeping a copy of theta0 (selection
``fisher``: sums squared gradients at theta0 instead and trains nothing; ``diff_pruning``: trains
theta0 + z * w, :mod:`.criteria`). At its end
the K entries are selected, the weights are reset to theta0 (an exact copy back), and phase 2
("sparse") trains only those entries.

Phase 2 mechanism. Per parameter with selected entries the optimiser sees one values vector
``v`` (K_i,), zero-initialised; the index vector ``idx`` (K_i,) and theta0 at those entries are
kept beside it. The weight itself stays a dense Parameter holding ``theta0 + scatter(idx, v)``:

* backward (``entry_gradients`` auto, sampled, dense; :mod:`.taps`): the weight stays frozen and
  taps on the Linear / Embedding modules that read it compute ``v.grad`` at the entries only (an
  SDDMM or a dense product per row block, the embeddings' batch rows), so no dense weight gradient
  is ever kept; biases, LayerNorms and anything else, or ``entry_gradients=autograd``: the weight
  has ``requires_grad``, autograd produces its dense gradient, and a post-accumulate-grad hook
  gathers ``grad[idx]`` into ``v.grad`` and drops it at once, so one tensor's dense gradient lives
  at a time and nothing is multiplied by a dense mask;
* step: AdamW updates ``v`` only (its state is 2 x K floats), then ``after_step`` writes
  ``theta0[idx] + v`` back into the weight with ``index_copy_``. Entries outside ``idx`` are never
  written, so they stay bit-identical to theta0.

Recipe details (L1, the head reset, ``freeze_decoder``): :mod:`.config`.
Why in place rather than a forward pre-hook that builds ``theta0 + scatter(v)`` per call: that
tensor would be a second dense copy of every masked weight, kept alive by autograd from forward
to backward (+1x model memory); in place costs O(K), needs no module surgery, and a tied weight
(MLM decoder = word embeddings) sees the delta automatically because it is the same tensor. The
evaluation at the end of training also sees the trained delta with no extra step.
"""

from __future__ import annotations

import gc
import time
from functools import partial

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from xlpeft.errors import XlpeftError
from xlpeft.methods.base import Phase
from xlpeft.methods.sft.applied import retie_decoder, untie_decoder
from xlpeft.methods.sft.config import SFTConfig, default_num_params, layer_params, split_steps
from xlpeft.methods.sft.criteria import DiffPruning, FisherScores, hand_over_gradients
from xlpeft.methods.sft.delta import SparseDelta
from xlpeft.methods.sft.dynamic import DynamicSelector, allocate, holds, random_subset
from xlpeft.methods.sft.memory import PeakMemory
from xlpeft.methods.sft.params import maskable_parameters
from xlpeft.methods.sft.selection import MovementScores, random_scores, top_k_indices
from xlpeft.methods.sft.taps import EntryTaps

_WEIGHT, _MOVEMENT, _INDICES, _VALUES = "full.weight.", "full.movement.", "sparse.indices.", "sparse.values."  # state keys


class SFTTrainable:
    """One LT-SFT being trained on ``base`` (its weights are changed in place until :meth:`close`)."""

    def __init__(self, base, config: SFTConfig, train_cfg) -> None:
        self.model = base.model
        self.config = config
        self.params = maskable_parameters(base, config)
        if not self.params:
            raise XlpeftError("sft: no maskable parameters (all frozen by freeze_layer_norm/include_embeddings?)")
        self.num_maskable = sum(p.numel() for p in self.params.values())
        if config.selection == "bias":
            self.num_params = sum(p.numel() for n, p in self.params.items() if n.endswith(".bias"))
        elif config.num_params is None:
            self.num_params = min(self.num_maskable, default_num_params(config.reference_num_params, layer_params(base.layers)))
        elif config.num_params > self.num_maskable:
            raise XlpeftError(
                f"num_params={config.num_params} but this model has {self.num_maskable} maskable entries; "
                "lower num_params (or leave it unset for the scaled default)"
            )
        else:
            self.num_params = config.num_params
        full, sparse = split_steps(config, train_cfg.max_steps, train_cfg.batch_size * train_cfg.grad_accum)
        self.lr = train_cfg.lr
        # random / bias selections need no phase 1: it is left out rather than run for 0 steps
        # composable-sft resets every parameter before phase 2, the task head included (reset_head)
        self.phases = ([Phase("full", full)] if full else []) + [Phase("sparse", sparse, reset_extras=config.reset_head)]
        self.seed = train_cfg.seed
        # after every check above (nothing to undo if one fails), before N below counts the decoder copy
        self._decoder = untie_decoder(self.model) if config.freeze_decoder else None
        # LT-SFT's L1 term is l1 * sum|delta| / (all model parameters); its gradient is added to the
        # weights' gradients, on every data-parallel rank a 1/world share, as ranks' gradients are summed
        world = torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1
        self.l1_scale = config.l1 / sum(p.numel() for p in self.model.parameters()) / world
        self.memory = PeakMemory(next(self.model.parameters()).device)
        self._theta0: dict[str, torch.Tensor] = {}
        self._movement: MovementScores | None = None
        self._fisher: FisherScores | None = None  # selection=fisher: phase 1 sums squared gradients at theta0
        self._diff: DiffPruning | None = None  # selection=diff_pruning: phase 1 learns theta0 + z * w
        self.indices: dict[str, torch.Tensor] = {}
        self._base_values: dict[str, torch.Tensor] = {}  # theta0 at ``indices``: exact restore
        self.values: dict[str, nn.Parameter] = {}
        self._hooks: list = []  # phase 2's gradient gathers
        self._full_hooks: list = []  # phase 1's L1 and movement hooks
        self._l1_due: set[str] = set()  # phase 1: parameters whose L1 subgradient this step still lacks
        self._pending: dict[str, float] = {}  # selection metrics not reported yet
        self._current: str | None = None  # the phase in progress
        self.selector: DynamicSelector | None = None  # selection=dynamic: SpIEL's drop and grow in phase 2
        self.taps: EntryTaps | None = None  # phase 2: gradients at the entries, no dense weight gradients

    # ---- the Trainable protocol
    def begin_phase(self, phase: Phase) -> list[nn.Parameter]:
        self._current = phase.name
        if phase.name == "full":
            self.memory.start()
            if self.config.selection == "fisher":
                self._fisher = FisherScores(self.params)
                return hand_over_gradients(self._fisher.accumulate, self.params, self._full_hooks)
            self._theta0 = {n: p.detach().clone() for n, p in self.params.items()}
            if self.config.selection == "diff_pruning":
                c = self.config  # Guo et al.'s released gate, penalty and alpha learning rate
                self._diff = DiffPruning(self.params, self._theta0, l0=c.diff_l0, seed=self.seed, init_alpha=5.0,
                                         beta=1.0, gamma=-1.5, zeta=1.5, num_params=1, alpha_scale=c.diff_alpha_lr / self.lr)
                hand_over_gradients(self._diff.backward, self.params, self._full_hooks)
                self._diff.write(train=True)  # the first step's gates
                return self._diff.parameters()
            if self.config.selection == "movement":
                self._movement = MovementScores(self.params, self._theta0, self.config.movement)
                self._full_hooks.append(register_optimizer_step_pre_hook(self._before_step))
            for name, p in self.params.items():
                p.requires_grad_(True)
                if self.l1_scale and self.config.l1_full_phase:
                    self._full_hooks.append(p.register_post_accumulate_grad_hook(partial(self._l1_full, name)))
            self._l1_due = set(self.params)
            return list(self.params.values())
        if phase.name == "sparse":
            if not self.indices:
                self._select()  # random / bias: nothing to learn from a phase 1
            self.memory.start()
            for name, idx in self.indices.items():
                p = self.params[name]
                self._base_values[name] = p.detach().view(-1)[idx].clone()  # (K_i,)
                self.values[name] = nn.Parameter(torch.zeros(len(idx), dtype=p.dtype, device=p.device))
            tapped: set[str] = set()
            if self.config.entry_gradients != "autograd":  # gradients at the entries only (taps.py)
                self.taps = EntryTaps(self, self.config.entry_gradients)
                tapped = self.taps.install(self.model, list(self.indices))
            for name in self.indices:
                if name in tapped:  # the weight stays frozen: its taps give v.grad
                    if self.l1_scale:
                        self._hooks.append(self.values[name].register_hook(partial(self._l1_values, name)))
                    continue
                p = self.params[name]
                p.requires_grad_(True)
                self._hooks.append(p.register_post_accumulate_grad_hook(partial(self._gather, name)))
            self._l1_due = set(self.indices)
            if self.config.selection == "dynamic":
                c = self.config
                self.selector = DynamicSelector(self, c.growth, c.reselect_every, c.accumulation_steps,
                                                c.reselection_rate, c.reselection_policy, phase.steps)
                self._hooks.append(register_optimizer_step_pre_hook(self._find_optimizer))
            return list(self.values.values())
        raise XlpeftError(f"sft has phases full and sparse; got {phase.name!r}")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What continues the current phase exactly: phase 1 the weights (+ movement scores), phase 2 indices + values.

        theta0 is not saved: a resumed run loads the same base, whose weights are theta0 again.
        """
        if self._current == "full" and self._fisher is not None:
            state = self._fisher.state_dict()
        elif self._current == "full" and self._diff is not None:
            state = self._diff.state_dict()
        elif self._current == "full":
            state = {f"{_WEIGHT}{n}": p.detach() for n, p in self.params.items()}
            if self._movement is not None:
                state.update({f"{_MOVEMENT}{n}": s for n, s in self._movement.scores.items()})
        elif self._current == "sparse":
            state = {f"{_INDICES}{n}": idx for n, idx in self.indices.items()}
            state.update({f"{_VALUES}{n}": v.detach() for n, v in self.values.items()})
            if self.selector is not None:
                state.update(self.selector.state_dict())
        else:
            raise XlpeftError("sft: state_dict() is only meaningful inside a phase")
        return {k: v.cpu().clone() for k, v in state.items()}

    def resume_phase(self, phase: Phase, state: dict[str, torch.Tensor]) -> list[nn.Parameter]:
        """Enter ``phase`` where :meth:`state_dict` left it, on a base whose weights are theta0 again."""
        if phase.name == "sparse":
            device = next(iter(self.params.values())).device
            self.indices = {n: state[f"{_INDICES}{n}"].to(device) for n in self.params if f"{_INDICES}{n}" in state}
            if not self.indices:
                raise XlpeftError("sft: the checkpoint holds no sparse indices; it was not written by an sft run")
        params = self.begin_phase(phase)  # theta0 is snapshotted here, from the fresh weights
        if self._fisher is not None or self._diff is not None:
            (self._fisher or self._diff).load_state_dict(state)  # checks the keys itself
            if self._diff is not None:  # the weights of the step being resumed: its draw again
                self._diff.draws -= 1
                self._diff.write(train=True)
            return params
        wanted = {f"{_WEIGHT}{n}" for n in self.params} if phase.name == "full" else {f"{_VALUES}{n}" for n in self.values}
        if self._movement is not None:
            wanted |= {f"{_MOVEMENT}{n}" for n in self.params}
        missing = sorted(wanted - set(state))
        if missing:
            raise XlpeftError(f"sft: the checkpoint does not fit this configuration; missing {missing[:3]} ...")
        with torch.no_grad():
            if phase.name == "full":
                for n, p in self.params.items():
                    p.copy_(state[f"{_WEIGHT}{n}"])
                    if self._movement is not None:
                        self._movement.scores[n].copy_(state[f"{_MOVEMENT}{n}"])
            else:
                for n, v in self.values.items():
                    v.copy_(state[f"{_VALUES}{n}"])
                if self.selector is not None:
                    self.selector.load_state_dict(state, next(iter(self.params.values())).device)
                self._write_back()
        return params

    def after_step(self, phase: Phase, step: int) -> None:
        if phase.name == "full":
            self._l1_due = set(self.params)
            if self._movement is not None:
                self._movement.after_step()
            if self._diff is not None:
                self._diff.write(train=True)  # the next step's gates
        elif phase.name == "sparse":
            self._write_back()
            self._l1_due = set(self.indices)
            if self.taps is not None:
                self.taps.after_step()
            if self.selector is not None:
                self.selector.after_step(step)  # may drop (back to theta0) and grow (at theta0) entries

    def end_phase(self, phase: Phase) -> dict[str, float]:
        self._current = None
        peak = self.memory.stop()
        if phase.name == "full":
            self._remove_full_hooks()
            for p in self.params.values():
                p.grad = None  # the last step's dense gradients (1x the model): selection does not need them
            gc.collect()  # phase 1's optimizer (2x the model) is garbage now, unless held in a cycle
            if self._fisher is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
                for name in self.params:  # every rank's examples in one Fisher sum, so all select one mask
                    torch.distributed.all_reduce(self._fisher(name))
            self._select()
            self._reset()
            return {"full_peak_memory_mb": peak, **self._pop_pending()}
        out = {"sparse_peak_memory_mb": peak, **self._pop_pending()}
        if self.taps is not None:
            out.update(self.taps.counts())
        if self.selector is not None:
            out.update({"reselections": float(self.selector.reselections), "replaced_entries": float(self.selector.replaced)})
        return out

    def replicated(self) -> torch.Tensor | None:
        """The selected indices, flattened: every data-parallel rank must have chosen the same mask."""
        if not self.indices:
            return None
        return torch.cat([i.reshape(-1).cpu() for i in self.indices.values()])

    def export(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        if not self.values:
            raise XlpeftError("sft: nothing to export before the sparse phase has run")
        delta = self.delta()
        extra = {
            "num_params": self.num_params, "selection": self.config.selection,
            "per_tensor_counts": delta.counts(), "maskable_parameters": self.num_maskable,
            "trainable_parameters": delta.num_params,
        }
        return {"delta": delta.to_tensors()}, extra

    def close(self) -> None:
        """Restore theta0 exactly, freeze the base again, remove hooks; safe to call in any state."""
        self.memory.stop()
        self._remove_full_hooks()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.taps is not None:
            self.taps.remove()
            self.taps = None
        if self._theta0:  # closed during phase 1
            self._reset()
        with torch.no_grad():
            for name, idx in self.indices.items():
                if name in self._base_values:
                    self.params[name].view(-1).index_copy_(0, idx, self._base_values[name])
        for p in self.params.values():
            p.requires_grad_(False)
            p.grad = None
        self._base_values.clear()
        if self._decoder is not None:
            retie_decoder(*self._decoder)
            self._decoder = None

    # ---- helpers
    def _l1_full(self, name: str, p: nn.Parameter) -> None:
        """Phase-1 post-accumulate-grad hook: add ``l1 * sign(theta - theta0) / N`` once per optimizer step."""
        if name in self._l1_due:
            self._l1_due.discard(name)
            with torch.no_grad():
                p.grad.add_(torch.sign(p.detach() - self._theta0[name]), alpha=self.l1_scale)

    def _l1_values(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """Tapped weights' values hook: add ``l1 * sign(v)`` (= sign(theta - theta0)) once per optimizer step."""
        if name not in self._l1_due:
            return grad
        self._l1_due.discard(name)
        return grad + self.l1_scale * self.values[name].detach().sign()

    def _before_step(self, optimizer, args, kwargs) -> None:
        """Global optimizer pre-step hook: paper movement scores at the weights the gradient was taken at."""
        probe = next(iter(self.params.values()))  # the hook sees every optimizer: act for the one training ours
        if self._movement is not None and any(holds(g, probe) for g in optimizer.param_groups):
            self._movement.before_step()

    def _find_optimizer(self, optimizer, args, kwargs) -> None:
        """Global optimizer pre-step hook: hand the optimizer training our values to the selector (moment seeding)."""
        probe = next(iter(self.values.values()))
        if self.selector is not None and any(holds(g, probe) for g in optimizer.param_groups):
            self.selector.optimizer = optimizer

    def _remove_full_hooks(self) -> None:
        for h in self._full_hooks:
            h.remove()
        self._full_hooks.clear()

    def delta(self) -> SparseDelta:
        """The delta trained so far, on CPU, indices ascending (a dynamic delta's slots are in no order)."""
        entries = {}
        for name, idx in self.indices.items():
            order = torch.argsort(idx.cpu())
            entries[name] = (idx.cpu()[order], self.values[name].detach().cpu()[order].clone())
        return SparseDelta(entries)

    def _gather(self, name: str, p: nn.Parameter) -> None:
        """Post-accumulate-grad hook: move ``grad[idx]`` into ``v.grad``; the dense gradient is dropped."""
        v = self.values[name]
        if self.selector is not None:
            self.selector.observe(name, p.grad)  # growth statistics, while the dense gradient exists
        g = p.grad.view(-1).index_select(0, self.indices[name])  # (K_i,)
        if v.grad is None:  # first micro-batch of the step: add the L1 (sub)gradient once
            v.grad = (g + self.l1_scale * v.detach().sign()) if self.l1_scale else g
        else:
            v.grad += g
        p.grad = None

    @torch.no_grad()
    def _write_back(self) -> None:
        for name, idx in self.indices.items():
            self.params[name].view(-1).index_copy_(0, idx, self._base_values[name] + self.values[name])

    def _select(self) -> None:
        start = time.perf_counter()
        self.memory.start()
        if self.config.selection == "bias":
            chosen = {n: torch.arange(p.numel()) for n, p in self.params.items() if n.endswith(".bias")}
        elif self.config.selection == "dynamic":  # SpIEL: a random start, K_i per tensor in proportion to its size
            gen = torch.Generator().manual_seed(self.seed)
            counts = allocate({n: p.numel() for n, p in self.params.items()}, self.num_params)
            chosen = {n: random_subset(self.params[n].numel(), k, gen) for n, k in counts.items()}
        else:
            numels = {n: p.numel() for n, p in self.params.items()}
            chosen = top_k_indices(numels, self._scorer(), self.num_params, generator=torch.Generator().manual_seed(self.seed))
        device = next(iter(self.params.values())).device
        self.indices = {n: idx.to(device) for n, idx in chosen.items() if len(idx)}
        self._movement = None
        self._pending = {
            "selection_seconds": time.perf_counter() - start, "selection_peak_memory_mb": self.memory.stop(),
            "selected_params": float(sum(len(i) for i in self.indices.values())),
        }

    def _scorer(self):
        selection = self.config.selection
        if selection == "magnitude":  # LT-SFT: |theta1 - theta0|
            return lambda n: (self.params[n].detach() - self._theta0[n]).abs_()
        if selection == "movement":
            return self._movement
        if selection == "fisher":
            return self._fisher
        if selection == "diff_pruning":
            return self._diff
        positions = {n: i for i, n in enumerate(self.params)}
        return lambda n: random_scores(self.params[n].numel(), self.seed, positions[n], self.params[n].device)

    @torch.no_grad()
    def _reset(self) -> None:
        for name, p in self.params.items():
            if name in self._theta0:  # fisher: the weights never left theta0
                p.copy_(self._theta0[name])
            p.requires_grad_(False)
            p.grad = None
        self._theta0 = {}
        self._movement = self._fisher = self._diff = None

    def _pop_pending(self) -> dict[str, float]:
        out, self._pending = self._pending, {}
        return out


def prepare_sft(base, config: SFTConfig, train_cfg) -> SFTTrainable:
    """Start training a sparse delta on ``base`` (on top of whatever is already applied to its weights)."""
    return SFTTrainable(base, config, train_cfg)
