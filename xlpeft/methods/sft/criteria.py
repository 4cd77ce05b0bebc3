"""Two more ways to score entries for LT-SFT's top-K: the FISH mask and diff pruning.

Both are scorers for :func:`~xlpeft.methods.sft.selection.top_k_indices` (``score(name) ->
tensor``), like :class:`~xlpeft.methods.sft.selection.MovementScores`; they differ in what phase 1
does before the selection.

* :class:`FisherScores` (Sung et al., NeurIPS 2021, "Training Neural Networks with Fixed Sparse
  Masks"): phase 1 runs a few batches at theta0 *without updating the weights* and sums the
  squared gradients, a diagonal empirical Fisher information.
* :class:`DiffPruning` (Guo et al., ACL 2021, "Parameter-Efficient Transfer Learning with Diff
  Pruning"): phase 1 trains theta = theta0 + z * w, with hard-concrete gates z(alpha) (Louizos et
  al., ICLR 2018) and an expected-L0 penalty on the gates; the score is the trained diff
  |z_det * w|. Guo et al. then magnitude-prune the diff to the target sparsity and fine-tune with the
  mask fixed, which is LT-SFT's phase 2.

Neither does module surgery: the model's weight stays the dense leaf that the forward pass reads,
and the caller's post-accumulate-grad hook on it hands the gradient over (``accumulate`` /
``backward``) and drops it (``p.grad = None``), as phase 2 of :mod:`.trainable` already does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial

import torch
from torch import nn

from xlpeft.errors import ConfigError, XlpeftError

_SCORES, _COUNTS = "fisher.scores.", "fisher.batches"  # FisherScores state keys
_W, _ALPHA, _DRAWS, _SEED = "diff.w.", "diff.alpha.", "diff.draws", "diff.seed"  # DiffPruning state keys
_MASK64 = (1 << 64) - 1


def _check_params(params: Mapping[str, torch.Tensor], who: str) -> None:
    if not params:
        raise ConfigError(f"{who}: expected at least one parameter to score; got none (is every weight frozen?)")
    bad = [n for n, p in params.items() if not p.is_floating_point()]
    if bad:
        raise ConfigError(f"{who}: parameters should be floating point; got {params[bad[0]].dtype} for {bad[0]!r}")


def _check_state(state: Mapping[str, torch.Tensor], wanted: Mapping[str, torch.Size], who: str) -> None:
    """Every wanted key present with its shape, and nothing else: a checkpoint of another run fails loudly."""
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    if missing or unexpected:
        raise XlpeftError(
            f"{who}: the checkpoint does not fit these parameters; missing {missing[:3]}, unexpected "
            f"{unexpected[:3]} (resume with the configuration and base the run was started with)"
        )
    for key, shape in wanted.items():
        if state[key].shape != shape:
            raise XlpeftError(f"{who}: {key} should have shape {tuple(shape)}; the checkpoint has {tuple(state[key].shape)}")


class FisherScores:
    """FISH-mask scores: the diagonal empirical Fisher information at theta0, summed over batches.

    Sung et al. define the empirical Fisher per example, F_i = (1/N) sum_n (d/dtheta_i log
    p(y_n | x_n))^2 over N examples with their true labels (their released code: batches of one
    example, N = 1024). This class implements the *mini-batch* form instead: each
    :meth:`accumulate` call adds the square of the gradient it is given, so a step's gradient of a
    mean loss over B examples contributes (mean_n g_n)^2 rather than mean_n g_n^2. The two agree at
    batch size 1; for B > 1 the mini-batch square drops most of the per-example variance (it is the
    squared mean, smaller where examples disagree), but it needs no per-example gradients, which
    would cost B backward passes or B dense copies of every weight's gradient. Called once per
    micro-batch (the hook clears ``p.grad`` each time), it sums squared micro-batch gradients, which
    is closer to the paper's form. The 1/N factor is left out: it does not change the ranking.

    Memory: one fp32 score tensor per parameter (1x the weights in fp32); no optimizer state.

    Usage: register, per parameter, a post-accumulate-grad hook that calls
    ``accumulate(name, p.grad)`` and then sets ``p.grad = None``, so the optimizer step changes
    nothing and the weights stay at theta0. Under data parallelism pass the gradient all ranks agree
    on (after the reduction), so every rank selects the same mask.
    """

    def __init__(self, params: Mapping[str, nn.Parameter]) -> None:
        _check_params(params, "FisherScores")
        self.scores = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        self._counts = dict.fromkeys(params, 0)  # gradients accumulated, per tensor

    @property
    def batches(self) -> int:
        """Gradients accumulated into the tensor reached most often (a tensor the loss skips gets fewer)."""
        return max(self._counts.values())

    @torch.no_grad()
    def accumulate(self, name: str, grad: torch.Tensor) -> None:
        """Add ``grad ** 2`` (in fp32) to the scores of ``name``."""
        scores = self.scores.get(name)
        if scores is None:
            raise XlpeftError(f"FisherScores: unknown parameter {name!r}; expected one of {list(self.scores)[:3]} ...")
        if grad.shape != scores.shape:
            raise XlpeftError(f"FisherScores: gradient of {name!r} should have shape {tuple(scores.shape)}; got {tuple(grad.shape)}")
        g = (grad.to_dense() if grad.is_sparse else grad).float()
        scores.addcmul_(g, g)
        self._counts[name] += 1

    def __call__(self, name: str) -> torch.Tensor:
        return self.scores[name]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Scores and per-tensor counts: loading them continues the sums bit for bit.

        The score tensors are the live ones, not copies (``SFTTrainable.state_dict`` copies what it saves).
        """
        state = {f"{_SCORES}{n}": s for n, s in self.scores.items()}
        state[_COUNTS] = torch.tensor(list(self._counts.values()), dtype=torch.int64)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        wanted = {f"{_SCORES}{n}": s.shape for n, s in self.scores.items()}
        wanted[_COUNTS] = torch.Size([len(self.scores)])
        _check_state(state, wanted, "FisherScores")
        for n, s in self.scores.items():
            s.copy_(state[f"{_SCORES}{n}"])
        self._counts = dict(zip(self.scores, (int(c) for c in state[_COUNTS]), strict=True))


def _stream_seed(seed: int, draw: int, position: int) -> int:
    """A 63-bit seed for one tensor's noise at one draw: splitmix64 over (seed, draw, position)."""
    x = 0
    for part in (seed, draw, position):
        x = (x + part + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


class DiffPruning:
    """Diff pruning on in-place weights: theta = theta0 + z(alpha) * w, trained by a hand-written chain rule.

    Gates (the hard concrete of Louizos et al. 2018, as Guo et al. 2021 use it): per entry, u ~ U(0, 1),
    s = sigmoid((log u - log(1 - u) + alpha) / beta), z = clamp(s * (zeta - gamma) + gamma, 0, 1);
    at evaluation z_det = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1). The penalty is the
    expected L0 norm of the diff, l0 * sum sigmoid(alpha - beta * log(-gamma / zeta)) / N, N =
    ``num_params`` (default: the gated entries; pass all model parameters to match LT-SFT's L1).

    Mechanism (no module surgery, no parametrization): the model's weight ``p`` stays the dense leaf
    the forward pass reads. Before each optimizer step :meth:`write` samples z and writes
    ``theta0 + z * w`` into ``p`` under no_grad; the caller's post-accumulate-grad hook on ``p``
    calls :meth:`backward` with dL/dtheta and then sets ``p.grad = None``; :meth:`backward` applies
    dtheta/dw = z and dtheta/dalpha = w * dz/dalpha, with
    dz/dalpha = (zeta - gamma) * s * (1 - s) / beta where 0 < s * (zeta - gamma) + gamma < 1, else 0,
    and adds the penalty's gradient l0 / N * sigma'(alpha - beta log(-gamma/zeta)) once per step.
    The optimizer trains :meth:`parameters` (w and alpha).

    The noise u of tensor i at draw t comes from its own generator seeded with (seed, t, i), so
    :meth:`backward` recomputes z instead of keeping it (one dense copy less) and a resume from
    :meth:`state_dict` (w, alpha, the draw counter) samples the same z, on the same device type.
    Every data-parallel rank draws the same z; the gradients of w and alpha are not reduced here.

    Memory: w, alpha and their two AdamW moments each = 6 dense fp32 copies of the gated weights
    beyond the weights themselves and the theta0 snapshot that LT-SFT's phase 1 keeps anyway
    (:meth:`extra_memory_bytes`); plus a few transient temporaries the size of one tensor at a time.

    Defaults and sources. beta = 2/3, gamma = -0.1, zeta = 1.1 are Louizos et al.'s. Guo
    et al.'s released scripts (github.com/dguo98/DiffPruning, README and
    ``examples/run_glue_diffpruning.py``) use instead: no temperature (beta = 1), a wider stretch
    gamma = -1.5, zeta = 1.5, ``alpha_init = 5`` so that gates start open (z = 1 in ~97% of draws), w
    initialised to zeros, l0 = 1.25e-7 on the *un-normalised* sum (N = 1), and AdamW with lr 0.1 for
    alpha. ``init_alpha = 5`` and ``init_w_std = 0`` follow them; pass ``beta=1.0, gamma=-1.5,
    zeta=1.5, num_params=1, l0=1.25e-7`` to reproduce their gate and penalty exactly (``SFTTrainable``
    does), and ``alpha_scale = 0.1 / lr`` for their alpha learning rate in the one optimizer the
    training loop runs: :attr:`alpha` then holds alpha / alpha_scale (see :meth:`_true_alpha`), also
    in :meth:`state_dict`.
    """

    def __init__(self, params: Mapping[str, nn.Parameter], theta0: Mapping[str, torch.Tensor], *,
                 l0: float, seed: int, init_alpha: float = 5.0, beta: float = 2 / 3, gamma: float = -0.1,
                 zeta: float = 1.1, init_w_std: float = 0.0, num_params: int | None = None,
                 alpha_scale: float = 1.0) -> None:
        _check_params(params, "DiffPruning")
        self._check_args(params, theta0, l0, init_alpha, beta, gamma, zeta, init_w_std, num_params)
        if not (math.isfinite(alpha_scale) and alpha_scale > 0):
            raise ConfigError(f"invalid DiffPruning: `alpha_scale` should be a finite number > 0; got {alpha_scale!r}")
        self.alpha_scale = float(alpha_scale)
        self.params, self.theta0 = params, theta0
        self.l0, self.seed, self.beta, self.gamma, self.zeta = float(l0), int(seed), float(beta), float(gamma), float(zeta)
        self.num_params = num_params if num_params is not None else sum(p.numel() for p in params.values())
        self.positions = {n: i for i, n in enumerate(params)}
        init = torch.Generator().manual_seed(_stream_seed(self.seed, -1, 0))
        self.w: dict[str, nn.Parameter] = {}
        self.alpha: dict[str, nn.Parameter] = {}
        for n, p in params.items():
            w = torch.zeros(p.shape, dtype=torch.float32)
            if init_w_std:
                w = torch.randn(p.shape, generator=init, dtype=torch.float32).mul_(init_w_std)
            self.w[n] = nn.Parameter(w.to(p.device))
            self.alpha[n] = nn.Parameter(torch.full(p.shape, float(init_alpha) / self.alpha_scale, dtype=torch.float32,
                                                    device=p.device))
        self.draws = 0  # write(train=True) calls so far; the current draw is draws - 1
        self._train: bool | None = None  # the gates last written: sampled (True), deterministic (False)
        self._penalty_due: set[str] = set()  # tensors whose penalty gradient this step still lacks

    @staticmethod
    def _check_args(params, theta0, l0, init_alpha, beta, gamma, zeta, init_w_std, num_params) -> None:
        problems = []
        for name, value, ok, expected in (
            ("l0", l0, l0 >= 0, ">= 0"), ("beta", beta, beta > 0, "> 0"), ("gamma", gamma, gamma < 0, "< 0"),
            ("zeta", zeta, zeta > 1, "> 1"), ("init_w_std", init_w_std, init_w_std >= 0, ">= 0"),
            ("init_alpha", init_alpha, True, "finite"),
        ):
            if not math.isfinite(value) or not ok:
                problems.append(f"`{name}` should be {expected}; got {value!r}")
        if num_params is not None and num_params < 1:
            problems.append(f"`num_params` should be >= 1 or None; got {num_params!r}")
        if set(theta0) != set(params):
            problems.append(f"`theta0` should have the parameters' names; missing {sorted(set(params) - set(theta0))[:3]}, "
                            f"extra {sorted(set(theta0) - set(params))[:3]}")
        else:
            problems += [f"theta0[{n!r}] should have shape {tuple(p.shape)}; got {tuple(theta0[n].shape)}"
                         for n, p in params.items() if theta0[n].shape != p.shape][:3]
        if problems:
            raise ConfigError("invalid DiffPruning: " + "; ".join(problems) +
                              " (the hard-concrete stretch needs gamma < 0 < 1 < zeta, Louizos et al. 2018)")

    # ---- what the optimizer and the loop use
    def parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains: every w, then every alpha (Guo et al. give alpha its own lr)."""
        return [*self.w.values(), *self.alpha.values()]

    @torch.no_grad()
    def write(self, train: bool) -> None:
        """Write theta0 + z * w into every weight: sampled gates if ``train`` (a new draw), else z_det."""
        if train:
            self.draws += 1
        self._train = train
        self._penalty_due = set(self.params)
        for name, p in self.params.items():
            z = self._gate(name, with_grad=False)[0]  # (same shape as p), fp32
            p.copy_(z.mul_(self.w[name]).add_(self.theta0[name]))

    @torch.no_grad()
    def backward(self, name: str, grad: torch.Tensor) -> None:
        """Chain rule from dL/dtheta of ``name`` to w.grad and alpha.grad (accumulating over micro-batches)."""
        if name not in self.params:
            raise XlpeftError(f"DiffPruning: unknown parameter {name!r}; expected one of {list(self.params)[:3]} ...")
        if self._train is None:
            raise XlpeftError("DiffPruning: backward() before write(); call write(train=True) before each step's forward")
        w, alpha = self.w[name], self.alpha[name]
        true_alpha = self._true_alpha(name)
        g = (grad.to_dense() if grad.is_sparse else grad).float()
        z, dz = self._gate(name, with_grad=True)
        gw = z.mul_(g)  # dL/dw = g * z
        ga = dz.mul_(g).mul_(w)  # dL/dalpha = g * w * dz/dalpha
        if name in self._penalty_due:  # the penalty is not per micro-batch: once per step
            self._penalty_due.discard(name)
            ga.add_(self._penalty_grad(true_alpha))
        if self.alpha_scale != 1.0:  # the optimizer's parameter is alpha / alpha_scale
            ga.mul_(self.alpha_scale)
        for param, update in ((w, gw), (alpha, ga)):
            if param.grad is None:
                param.grad = update
            else:
                param.grad.add_(update)

    def __call__(self, name: str) -> torch.Tensor:
        """Selection score |z_det * w|: the diff as evaluated, the magnitude Guo et al. prune by."""
        with torch.no_grad():
            return self._deterministic(self._true_alpha(name))[0].mul_(self.w[name]).abs_()

    # ---- the gates
    def uniform(self, name: str) -> torch.Tensor:
        """The U(0, 1) noise behind the current draw's gates of ``name`` (recomputed from the seed)."""
        if self.draws < 1:
            raise XlpeftError("DiffPruning: no gates sampled yet; call write(train=True) first")
        alpha = self.alpha[name]
        gen = torch.Generator(device=alpha.device).manual_seed(_stream_seed(self.seed, self.draws - 1, self.positions[name]))
        u = torch.rand(alpha.shape, generator=gen, device=alpha.device)
        return u.clamp_(1e-6, 1 - 1e-6)  # log u and log(1 - u) finite

    def _gate(self, name: str, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(z, dz/dalpha or None) of the gates last written: sampled or deterministic."""
        alpha = self._true_alpha(name)
        if not self._train:
            return self._deterministic(alpha, with_grad)
        s = self.uniform(name)
        s = s.log().sub_(torch.log1p(-s)).add_(alpha).div_(self.beta).sigmoid_()  # (log u - log(1-u) + alpha) / beta
        return self._stretch(s, 1.0 / self.beta, with_grad)

    def _deterministic(self, alpha: torch.Tensor, with_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._stretch(torch.sigmoid(alpha.detach()), 1.0, with_grad)

    def _stretch(self, s: torch.Tensor, ds_scale: float, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """z = clamp(s (zeta - gamma) + gamma, 0, 1) and, if asked, dz/dalpha = 1[0 < zbar < 1] (zeta - gamma) s (1 - s) ds_scale."""
        span = self.zeta - self.gamma
        dz = s.mul(1 - s).mul_(span * ds_scale) if with_grad else None
        zbar = s.mul_(span).add_(self.gamma)  # in place: ``s`` is always a fresh temporary
        if dz is not None:
            dz.mul_((zbar > 0) & (zbar < 1))
        return zbar.clamp_(0.0, 1.0), dz

    def _true_alpha(self, name: str) -> torch.Tensor:
        """The gates' log-alpha: the optimizer's parameter times ``alpha_scale``.

        Adam's step is about lr whatever the gradient's scale, so a separate learning rate for alpha
        (Guo et al.: 0.1, against ~1e-5 for w) is had in one optimizer by training alpha / scale with
        scale = lr_alpha / lr: the step on alpha is then about lr_alpha."""
        alpha = self.alpha[name].detach()
        return alpha if self.alpha_scale == 1.0 else alpha * self.alpha_scale

    # ---- the penalty
    def _penalty_grad(self, alpha: torch.Tensor) -> torch.Tensor:
        sig = torch.sigmoid(alpha.detach() - self.beta * math.log(-self.gamma / self.zeta))
        return sig.mul_(1 - sig).mul_(self.l0 / self.num_params)

    def penalty(self) -> float:
        """l0 * E[L0] / N: the penalty term of the loss, for logging (its gradient is in :meth:`backward`)."""
        shift = self.beta * math.log(-self.gamma / self.zeta)
        with torch.no_grad():
            total = sum(float(torch.sigmoid(self._true_alpha(n) - shift).sum(dtype=torch.float64)) for n in self.alpha)
        return self.l0 * total / self.num_params

    # ---- state and memory
    def state_dict(self) -> dict[str, torch.Tensor]:
        """w, alpha and the draw counter (with the seed, checked on load): a resume samples the same z.

        w and alpha are the live tensors, not copies (``SFTTrainable.state_dict`` copies what it saves).
        The optimizer's moments are the loop's to save, as for any trained parameter.
        """
        state = {f"{_W}{n}": w.detach() for n, w in self.w.items()}
        state.update({f"{_ALPHA}{n}": a.detach() for n, a in self.alpha.items()})
        state[_DRAWS] = torch.tensor(self.draws, dtype=torch.int64)
        state[_SEED] = torch.tensor(self.seed, dtype=torch.int64)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load in place (the optimizer keeps its references to w and alpha)."""
        wanted = {f"{_W}{n}": w.shape for n, w in self.w.items()}
        wanted.update({f"{_ALPHA}{n}": a.shape for n, a in self.alpha.items()})
        wanted.update({_DRAWS: torch.Size([]), _SEED: torch.Size([])})
        _check_state(state, wanted, "DiffPruning")
        if int(state[_SEED]) != self.seed:
            raise XlpeftError(f"DiffPruning: the checkpoint was trained with seed {int(state[_SEED])}, this run has "
                              f"seed {self.seed}; resume with the original seed so the same gates are sampled")
        for n in self.params:
            self.w[n].copy_(state[f"{_W}{n}"])
            self.alpha[n].copy_(state[f"{_ALPHA}{n}"])
        self.draws = int(state[_DRAWS])
        self._train, self._penalty_due = None, set()

    def extra_memory_bytes(self) -> int:
        """6 fp32 copies of the gated entries: w, alpha, and AdamW's two moments of each."""
        return 6 * 4 * sum(p.numel() for p in self.params.values())


def hand_over_gradients(receive, params: Mapping[str, nn.Parameter], handles: list) -> list[nn.Parameter]:
    """Phase 1 of FISH and diff pruning: every weight requires grad, and a post-accumulate-grad hook hands
    each micro-batch's gradient to ``receive(name, grad)`` and drops it, so the optimizer never applies it.
    The hooks' handles are appended to ``handles`` (the caller removes them)."""

    def hook(name: str, p: nn.Parameter) -> None:
        receive(name, p.grad)
        p.grad = None

    for name, p in params.items():
        p.requires_grad_(True)
        handles.append(p.register_post_accumulate_grad_hook(partial(hook, name)))
    return list(params.values())

