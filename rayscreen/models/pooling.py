"""MIL pooling: class-specific maps (B, K, h, w) -> bag scores (B, K).

Each location of a class-specific map is an *instance*, the whole map of class ``k`` is
the *bag* (Kraus et al. 2016; the WSCNN paper's global max pooling is the ``max`` case).
The maths lives in pure functions over the flattened instances ``(B, K, N)``; the
``nn.Module`` wrappers (registered by name, see :func:`rayscreen.models.create_pooling`)
flatten the maps and always return **logits** (B, K), so every pooling trains with
``F.cross_entropy`` and ``softmax(logits)`` gives class probabilities.

Two families (attribute ``space`` of each module):

- ``"logits"``: pool the raw map values ``z`` directly; the pooled value *is* the logit.
  ``max`` (WSCNN), ``mean`` (WSCNN-Avg), ``lse`` (log-sum-exp, sharpness ``r``),
  ``attention`` (gated attention, Ilse et al. 2018), ``fc`` (WSCNN-FC, not a pooling in
  the MIL sense: a linear layer over the whole map, so not permutation invariant).
- ``"probabilities"``: instance probabilities ``p = sigmoid(z)`` pooled into a bag
  probability ``P`` in [0, 1] (``gm``, ``noisy_or``, ``isr``, ``noisy_and``; ``lse``
  and ``mean`` too with ``space="probabilities"``), returned as the logit
  ``log(P) - log(1 - P)``, the inverse of the instance sigmoid. This choice keeps the
  families consistent: a bag of one instance has logit ``z``, and max-pooled
  probabilities give exactly max-pooled logits. It is computed in log space where a
  closed form exists (ISR: ``logit(P) = logsumexp(z)``; Noisy-OR through
  ``sum(log(1 - p))``; the mean of probabilities and Noisy-AND through
  :func:`mean_prob_logit` / :func:`noisy_and_logit`), so a bag that no instance supports
  keeps its gradient; otherwise P is kept in ``[tiny, 1 - EPS]`` only against underflow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-7  # probability clamp before the logit; logit(1 - 1e-7) ~ 16


# ---------------------------------------------------------------- pure functions
# Inputs are instances along the last dim: (..., N). Outputs drop that dim: (...).

def flatten_instances(maps: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) class maps -> (B, K, N) instances, N = h * w."""
    if maps.dim() != 4:
        raise ValueError(f"class maps must be (B, K, h, w), got shape {tuple(maps.shape)}")
    return maps.flatten(2)


def max_pool(x: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (...): the largest instance (WSCNN's global max pooling)."""
    return x.amax(dim=-1)


def mean_pool(x: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (...): the instance mean (global average pooling)."""
    return x.mean(dim=-1)


def lse_pool(x: torch.Tensor, r: float) -> torch.Tensor:
    """(..., N) -> (...): ``(1/r) log((1/N) sum exp(r x))``.

    Tends to ``max`` as ``r -> inf`` and to ``mean`` as ``r -> 0`` (computed stably for
    any r > 0 via logsumexp; for very small r the mean is the exact limit).
    """
    if r <= 0:
        raise ValueError(f"lse sharpness r={r}: expected r > 0")
    # two forms, each where it is accurate in float32: logsumexp (no overflow) when the bag's
    # instances spread over r * (max - min) >= 1; else centred at the max through
    # expm1/log1p, which keeps the digits the logsumexp form loses to log(N) as r -> 0 (but
    # sums N rounded terms: 5e-4 off at N = 10^4, r = 1, where logsumexp is 6e-7 off)
    m = x.amax(dim=-1, keepdim=True)
    centred = m.squeeze(-1) + torch.log1p(torch.expm1(r * (x - m)).mean(dim=-1)) / r
    standard = (torch.logsumexp(r * x, dim=-1) - math.log(x.shape[-1])) / r
    return torch.where(r * (m.squeeze(-1) - x.amin(dim=-1)) < 1.0, centred, standard)


def gm_pool(p: torch.Tensor, r: float) -> torch.Tensor:
    """(..., N) probabilities -> (...): generalised mean ``((1/N) sum p^r)^(1/r)``.

    ``r = 1`` is the mean; ``r -> inf`` tends to max (and ``r -> 0`` to the geometric
    mean, which is below the arithmetic mean). Requires ``p >= 0``.
    """
    if r <= 0:
        raise ValueError(f"gm exponent r={r}: expected r > 0")
    return torch.exp(_gm_log(torch.log(p.clamp_min(1e-30)), r))


def _gm_log(log_p: torch.Tensor, r: float) -> torch.Tensor:
    """log of the generalised mean, from log-probabilities (stable for large r)."""
    return lse_pool(log_p, r)


def noisy_or_pool(p: torch.Tensor) -> torch.Tensor:
    """(..., N) probabilities -> (...): ``1 - prod(1 - p)``."""
    return 1.0 - torch.prod(1.0 - p, dim=-1)


def isr_pool(p: torch.Tensor) -> torch.Tensor:
    """(..., N) probabilities -> (...): ISR, ``v = p/(1-p)``, ``sum v / (1 + sum v)``."""
    v = (p / (1.0 - p).clamp_min(EPS)).sum(dim=-1)
    return v / (1.0 + v)


def noisy_and_pool(p: torch.Tensor, a: float, b: torch.Tensor) -> torch.Tensor:
    """(..., N) probabilities -> (...): Kraus' Noisy-AND with slope ``a`` and threshold ``b``.

    ``pbar = mean p``; ``P = [s(a(pbar - b)) - s(-ab)] / [s(a(1 - b)) - s(-ab)]`` with
    ``s`` the sigmoid. ``b`` broadcasts against the pooled shape (e.g. (K,) for (B, K, N)).
    The normalisation maps ``pbar = 0 -> 0`` and ``pbar = 1 -> 1``; P is increasing in
    every instance probability for ``a > 0`` and any real ``b``.
    """
    pbar = p.mean(dim=-1)
    lo = torch.sigmoid(-a * b)
    hi = torch.sigmoid(a * (1.0 - b))
    return (torch.sigmoid(a * (pbar - b)) - lo) / (hi - lo).clamp_min(1e-12)


def prob_to_logit(P: torch.Tensor) -> torch.Tensor:
    """Bag probability -> logit ``log P - log(1 - P)``; P kept in [tiny, 1 - EPS] only so
    that an underflow to 0 (or a rounding to 1) gives a finite logit. The floor is the
    dtype's smallest normal number, not EPS: a floor at 1e-7 fixed the logit of every bag
    below it at -16 with zero gradient, and a bag no instance supports could never recover.
    Computed in float32 (returns float32 for a half-precision P): in bfloat16 ``1 - EPS``
    rounds to 1.0, so the clamp would let P = 1 through to an infinite logit."""
    P = P.float()
    P = P.clamp(torch.finfo(P.dtype).tiny, 1.0 - EPS)
    return torch.log(P) - torch.log1p(-P)


_LN2 = math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate over the whole range (Maechler 2012:
    ``log(-expm1(x))`` near 0, ``log1p(-exp(x))`` below -log 2). ``x`` is kept below
    -tiny, so ``x = 0`` (an underflow upstream) gives about -87, not -inf. Each branch sees
    only inputs valid for it: no NaN reaches the gradient through ``torch.where``."""
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near = x > -_LN2
    a = torch.log(-torch.expm1(torch.where(near, x, torch.full_like(x, -_LN2))))
    b = torch.log1p(-torch.exp(torch.where(near, torch.full_like(x, -_LN2), x)))
    return torch.where(near, a, b)


def noisy_or_logit(z: torch.Tensor) -> torch.Tensor:
    """(..., N) instance logits -> (...) logit of the Noisy-OR bag probability.

    ``log(1 - P) = sum log(1 - p) = sum logsigmoid(-z)`` and ``log P = log1mexp(log(1 - P))``
    (both exact in log space), so the logit stays accurate where ``P`` or ``1 - P`` underflows.
    """
    log_q = F.logsigmoid(-z).sum(dim=-1)  # log(1 - P) <= 0
    return log1mexp(log_q) - log_q


def mean_prob_logit(z: torch.Tensor) -> torch.Tensor:
    """(..., N) instance logits -> (...) logit of ``P = mean sigmoid(z)``, exactly:
    ``log P - log(1 - P) = logsumexp(logsigmoid(z)) - logsumexp(logsigmoid(-z))`` (the
    ``log N`` terms cancel); no clamp, so no bag loses its gradient."""
    return torch.logsumexp(F.logsigmoid(z), dim=-1) - torch.logsumexp(F.logsigmoid(-z), dim=-1)


def _log1mexp_neg_exp(log_x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(-x))`` for ``x > 0`` given as ``log x``: accurate also where ``x`` itself
    underflows (there ``log(1 - exp(-x)) = log x - x/2 + O(x^2)``, the dropped term below
    1e-10 for ``log x < -10``), so the result keeps its gradient for any ``log x``."""
    x = torch.exp(log_x)
    small = log_x < -10.0
    # each branch sees only inputs valid for it (no NaN through torch.where's gradient)
    return torch.where(small, log_x - 0.5 * x, log1mexp(-torch.where(small, torch.ones_like(x), x)))


def noisy_and_logit(z: torch.Tensor, a: float, b: torch.Tensor) -> torch.Tensor:
    """(..., N) instance logits -> (...) logit of Kraus' Noisy-AND bag probability, exactly.

    With ``pbar = mean sigmoid(z)``, ``u = a (pbar - b)``, ``v = -a b``, ``w = a (1 - b)``,
    ``P = (s(u) - s(v)) / (s(w) - s(v))`` (:func:`noisy_and_pool`). Since
    ``s(u) - s(v) = s(u) s(-v) (1 - exp(v - u))``,

    ``logit P = u + logsigmoid(-v) - logsigmoid(w) + log1mexp(-a pbar) - log1mexp(-a qbar)``

    with ``qbar = 1 - pbar = mean sigmoid(-z)``, in log space: finite and with a gradient
    for every bag, where the probability form rounds P to 0 (or 1) and a clamp then stops
    the gradient. ``qbar`` is computed from ``-z``, never as ``1 - pbar``: ``pbar`` rounds
    to 1.0 once every instance logit is above ~16.6 in float32 (~6.2 in bfloat16), and
    ``1 - pbar`` would then be 0 (a logit near 92 with no gradient). Both means are kept
    as logs (as in :func:`mean_prob_logit`), so they do not underflow either. Computed in
    float32 whatever the input dtype (returns float32).
    """
    z = z.float()
    b = torch.as_tensor(b, device=z.device).float()
    log_n = math.log(z.shape[-1])
    log_pbar = torch.logsumexp(F.logsigmoid(z), dim=-1) - log_n
    log_qbar = torch.logsumexp(F.logsigmoid(-z), dim=-1) - log_n
    u = a * (torch.exp(log_pbar) - b)
    return (u + F.logsigmoid(a * b) - F.logsigmoid(a * (1.0 - b))
            + _log1mexp_neg_exp(log_pbar + math.log(a)) - _log1mexp_neg_exp(log_qbar + math.log(a)))


def isr_logit(z: torch.Tensor) -> torch.Tensor:
    """(..., N) instance logits -> (...) ISR logit: ``v = exp(z)``, so logit(P) = logsumexp(z)."""
    return torch.logsumexp(z, dim=-1)


# ---------------------------------------------------------------- modules

class MILPooling(nn.Module):
    """Base: ``forward(maps (B, K, h, w)) -> logits (B, K)``.

    ``space``: ``"logits"`` or ``"probabilities"`` (see the module docstring);
    ``permutation_invariant``: whether shuffling the h*w instances leaves the output unchanged.
    ``size_invariant``: whether a bag of the same evidence at another size (a whole field
    where training saw crops or tiles) gets about the same logit: true of max, means and
    attention; noisy-OR and ISR add up evidence over instances (more instances, higher
    score), and the FC head sees a fixed grid.
    ``bag(maps)`` returns the pooled value in its own space (for probabilities: P in [0, 1]).
    """

    space = "logits"
    permutation_invariant = True
    size_invariant = True

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = int(num_classes)

    def pool(self, x: torch.Tensor) -> torch.Tensor:  # (B, K, N) -> (B, K), own space
        raise NotImplementedError

    def bag(self, maps: torch.Tensor) -> torch.Tensor:
        x = flatten_instances(maps)
        # probabilities in float32: a bfloat16 sigmoid is 1.0 from z ~ 5.5 on, which saturates the bag
        return self.pool(torch.sigmoid(x.float()) if self.space == "probabilities" else x)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        out = self.bag(maps)
        return prob_to_logit(out) if self.space == "probabilities" else out

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, space={self.space!r}"


class MaxPooling(MILPooling):
    """Global max over instances (WSCNN)."""

    def pool(self, x):
        return max_pool(x)


class MeanPooling(MILPooling):
    """Global average over instances (WSCNN-Avg); ``space="probabilities"`` averages sigmoid(z)."""

    def __init__(self, num_classes: int, space: str = "logits"):
        super().__init__(num_classes)
        self.space = _check_space(space)

    def pool(self, x):
        return mean_pool(x)

    def forward(self, maps):
        if self.space == "probabilities":
            return mean_prob_logit(flatten_instances(maps))
        return self.bag(maps)


class LSEPooling(MILPooling):
    """Log-sum-exp with sharpness ``r`` (default 5); on logits by default, or on
    instance probabilities (Kraus' table) with ``space="probabilities"``."""

    def __init__(self, num_classes: int, r: float = 5.0, space: str = "logits"):
        super().__init__(num_classes)
        if r <= 0:
            raise ValueError(f"lse pooling: r={r}, expected r > 0")
        self.r = float(r)
        self.space = _check_space(space)

    def pool(self, x):
        return lse_pool(x, self.r)

    def extra_repr(self):
        return super().extra_repr() + f", r={self.r}"


class GMPooling(MILPooling):
    """Generalised mean of instance probabilities with exponent ``r`` (default 2; kwarg ``p``
    accepted as an alias, the name used in the issue)."""

    space = "probabilities"

    def __init__(self, num_classes: int, r: float | None = None, p: float | None = None):
        super().__init__(num_classes)
        r = r if r is not None else (p if p is not None else 2.0)
        if r <= 0:
            raise ValueError(f"gm pooling: exponent r={r}, expected r > 0")
        self.r = float(r)

    def pool(self, x):
        return gm_pool(x, self.r)

    def forward(self, maps):
        # in log space: log p = logsigmoid(z), so very negative logits do not underflow to 0
        log_P = _gm_log(F.logsigmoid(flatten_instances(maps)), self.r)
        return log_P - log1mexp(log_P)

    def extra_repr(self):
        return super().extra_repr() + f", r={self.r}"


class NoisyOrPooling(MILPooling):
    """Noisy-OR ``1 - prod(1 - p)``; logits computed in log space (:func:`noisy_or_logit`)."""

    space = "probabilities"
    size_invariant = False

    def pool(self, x):
        return noisy_or_pool(x)

    def forward(self, maps):
        return noisy_or_logit(flatten_instances(maps))


class ISRPooling(MILPooling):
    """Integrated segmentation and recognition; logit(P) = logsumexp(z) exactly."""

    space = "probabilities"
    size_invariant = False

    def pool(self, x):
        return isr_pool(x)

    def forward(self, maps):
        return isr_logit(flatten_instances(maps))


class NoisyAndPooling(MILPooling):
    """Kraus' Noisy-AND: fixed slope ``a`` (default 10), threshold ``b`` learned per class
    (parameter of shape (K,), initialised to ``b_init``, default 0.5)."""

    space = "probabilities"

    def __init__(self, num_classes: int, a: float = 10.0, b_init: float = 0.5):
        super().__init__(num_classes)
        if a <= 0:
            raise ValueError(f"noisy_and pooling: slope a={a}, expected a > 0")
        self.a = float(a)
        self.b = nn.Parameter(torch.full((self.num_classes,), float(b_init)))

    def pool(self, x):
        return noisy_and_pool(x, self.a, self.b.to(x.dtype))

    def forward(self, maps):
        return noisy_and_logit(flatten_instances(maps), self.a, self.b)  # float32 inside, b too

    def extra_repr(self):
        return super().extra_repr() + f", a={self.a}"


class AttentionPooling(MILPooling):
    """Gated attention (Ilse et al. 2018) over instances whose embedding is their K class scores.

    ``w_n = softmax_n(w^T (tanh(V h_n) * sigmoid(U h_n)))`` with ``h_n`` in R^K the class
    scores at location n; the bag logits are ``sum_n w_n h_n`` (a learned weighted mean,
    between mean and max). ``hidden`` is the attention dimension L (default 32).
    """

    def __init__(self, num_classes: int, hidden: int = 32):
        super().__init__(num_classes)
        self.V = nn.Linear(self.num_classes, hidden)
        self.U = nn.Linear(self.num_classes, hidden)
        self.w = nn.Linear(hidden, 1)

    def attention(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) -> attention weights (B, h*w), summing to 1 per bag."""
        h = flatten_instances(maps).transpose(1, 2)  # (B, N, K)
        scores = self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))).squeeze(-1)
        return torch.softmax(scores, dim=1)

    def pool(self, x):
        raise NotImplementedError("attention pools whole maps; call forward(maps)")

    def bag(self, maps):
        a = self.attention(maps)
        return torch.einsum("bn,bkn->bk", a, flatten_instances(maps))


class FCPooling(MILPooling):
    """WSCNN-FC: a fully connected layer over the whole class maps instead of global pooling.

    Maps are first brought to a fixed ``grid`` (default (21, 30): the final map of
    ``wscnn`` on a 210x280 field, where this is exactly the paper's FC) by adaptive
    average pooling, so any input size works; then ``Linear(K * gh * gw -> K)``.
    Not permutation invariant: it models where evidence lies.
    """

    permutation_invariant = False
    size_invariant = False

    def __init__(self, num_classes: int, grid: tuple[int, int] | list[int] = (21, 30)):
        super().__init__(num_classes)
        self.grid = (int(grid[0]), int(grid[1]))
        self.fc = nn.Linear(self.num_classes * self.grid[0] * self.grid[1], self.num_classes)

    def bag(self, maps):
        if maps.dim() != 4:
            raise ValueError(f"class maps must be (B, K, h, w), got shape {tuple(maps.shape)}")
        if tuple(maps.shape[-2:]) != self.grid:
            maps = F.adaptive_avg_pool2d(maps, self.grid)
        return self.fc(maps.flatten(1))

    def extra_repr(self):
        return super().extra_repr() + f", grid={self.grid}"


def _check_space(space: str) -> str:
    if space not in ("logits", "probabilities"):
        raise ValueError(f"pooling space {space!r}: expected 'logits' or 'probabilities'")
    return space


POOLING_CLASSES: dict[str, type[MILPooling]] = {
    "max": MaxPooling,
    "mean": MeanPooling,
    "lse": LSEPooling,
    "gm": GMPooling,
    "noisy_or": NoisyOrPooling,
    "isr": ISRPooling,
    "noisy_and": NoisyAndPooling,
    "attention": AttentionPooling,
    "fc": FCPooling,
}
