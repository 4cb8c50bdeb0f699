# SPDX-License-Identifier: Apache-2.0
"""The memory MLP M_Θ and its test-time update rule, by the chunked dual form (docs/MATH.md §1-3, §8).

Layout: tokens are rows. Keys, values and queries are ``(..., T, d)``, gates ``(..., T)``, the
memory weights ``W_l`` are ``(..., n_l, n_{l-1})`` (the C++ layout of one layer, with any batch
dimensions in front, e.g. ``(B, H)`` for B sequences of H heads). Everything is written with
differentiable torch operations, including the inner gradient, so autograd differentiates
through the test-time updates (second order) with no hand-written backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch

ACTIVATIONS = ("silu", "gelu", "identity")


class ConfigError(ValueError):
    """A config value is out of range (the C++ side's InvalidArgument)."""


def _check_int(where: str, name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: {name} is {value!r}, expected an integer in [{lo}, {hi}]")
    if value < lo or value > hi:
        raise ConfigError(f"{where}: {name} is {value}, expected a value in [{lo}, {hi}]")


def _check_real(where: str, name: str, value, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: {name} is {value!r}, expected a finite number")
    if positive and not value > 0:
        raise ConfigError(f"{where}: {name} is {value}, expected a finite value > 0")
    if not positive and value < 0:
        raise ConfigError(f"{where}: {name} is {value}, expected a finite value >= 0")


BIASES = ("l2", "huber", "huber_radial", "lp")


def uses_threshold(bias: str) -> bool:
    """The huber biases read a threshold δ_t > 0 per token."""
    return bias in ("huber", "huber_radial")


@dataclass
class MemoryConfig:
    """Shape of one memory MLP (C++ ``titans::MemoryConfig``)."""

    dim: int = 64
    depth: int = 2
    expansion: int = 4
    activation: str = "silu"
    residual: bool = False
    output_norm: bool = False
    norm_eps: float = 1e-5
    surprise_clamp: float = 0.0
    bias: str = "l2"  # the attentional bias, the inner loss ℓ(M(k) − v): one of BIASES (docs/MATH.md §11)
    bias_p: float = 3.0  # p >= 1 of the lp bias
    bias_eps: float = 1e-6  # ε > 0 of the lp bias's |x|_ε = sqrt(x² + ε)

    def validate(self, where: str = "titans_torch.MemoryConfig") -> None:
        _check_int(where, "dim (d)", self.dim, 1, 1 << 16)
        _check_int(where, "depth (L)", self.depth, 1, 16)
        _check_int(where, "expansion (E)", self.expansion, 1, 64)
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"{where}: activation is {self.activation!r}, expected one of {', '.join(ACTIVATIONS)}")
        _check_real(where, "norm_eps", self.norm_eps, positive=True)
        _check_real(where, "surprise_clamp", self.surprise_clamp)
        if self.bias not in BIASES:
            raise ConfigError(f"{where}: bias is {self.bias!r}, expected one of {', '.join(BIASES)}")
        _check_real(where, "bias_eps", self.bias_eps, positive=True)
        _check_real(where, "bias_p", self.bias_p)
        if not self.bias_p >= 1:
            raise ConfigError(f"{where}: bias_p is {self.bias_p}, expected a finite value >= 1")

    def layer_out(self, l: int) -> int:
        return self.dim if l == self.depth - 1 else self.expansion * self.dim

    def layer_in(self, l: int) -> int:
        return self.dim if l == 0 else self.expansion * self.dim


# --- the nonlinearity and its derivative (both differentiable) -------------------------------

_INV_SQRT2 = 0.70710678118654752440
_INV_SQRT_2PI = 0.39894228040143267794


def phi(activation: str, z: torch.Tensor) -> torch.Tensor:
    if activation == "silu":
        return z / (1 + torch.exp(-z))
    if activation == "gelu":  # exact (erf) form
        return z * (0.5 * (1 + torch.erf(z * _INV_SQRT2)))
    return z


def dphi(activation: str, z: torch.Tensor) -> torch.Tensor:
    if activation == "silu":
        s = 1 / (1 + torch.exp(-z))
        return s * (1 + z * (1 - s))
    if activation == "gelu":
        return 0.5 * (1 + torch.erf(z * _INV_SQRT2)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return torch.ones_like(z)


# --- read-out of the last layer (§1, §8.3) ------------------------------------------------------

def _layer_norm(z: torch.Tensor, eps: float):
    """(z - mean) / sigma over the last dimension, and 1/sigma (keepdim)."""
    centred = z - z.mean(dim=-1, keepdim=True)
    rsigma = 1 / torch.sqrt((centred * centred).mean(dim=-1, keepdim=True) + eps)
    return centred * rsigma, rsigma


def _gain(gain: torch.Tensor) -> torch.Tensor:
    # gain is (..., d) with the batch dimensions of the weights; tokens are dimension -2.
    return gain.unsqueeze(-2)


def readout(cfg: MemoryConfig, z: torch.Tensor, x: torch.Tensor, gain: Optional[torch.Tensor]) -> torch.Tensor:
    """M(x) from the last layer's pre-activation z: [x +] (output_norm ? γ ⊙ LN(z) : z)."""
    if cfg.output_norm:
        zhat, _ = _layer_norm(z, cfg.norm_eps)
        y = zhat * _gain(gain)
    else:
        y = z
    if cfg.residual:
        y = y + x
    return y


def _over_threshold(r: torch.Tensor, thr: torch.Tensor):
    """‖r‖² per token (..., n, 1), and where ‖r‖ > δ (the large-residual branch of the huber biases)."""
    n2 = (r * r).sum(dim=-1, keepdim=True)
    d = thr.unsqueeze(-1)
    return n2, torch.sqrt(n2.detach()) > d.detach(), d


def bias_gradient(cfg: MemoryConfig, r: torch.Tensor, thr: Optional[torch.Tensor]) -> torch.Tensor:
    """e = ∇_r ℓ(r) for residuals r (..., n, d) (§11.2): 2r (l2); 2δ sign(r) where ‖r‖ > δ, else
    2r (huber); 2δ r/‖r‖ where ‖r‖ > δ, else 2r (huber_radial); p (r² + ε)^{(p−2)/2} r (lp).
    thr: δ (..., n) with the huber biases. Autograd through it gives the Hessians of §11.3."""
    if cfg.bias == "l2":
        return 2 * r
    if cfg.bias == "lp":
        p = float(cfg.bias_p)
        return p * (r * r + float(cfg.bias_eps)) ** ((p - 2) / 2) * r
    n2, over, d = _over_threshold(r, thr)
    if cfg.bias == "huber":
        return torch.where(over, 2 * d * torch.sign(r), 2 * r)
    # huber_radial: the norm only where it is used, so that its derivative is never taken at 0
    norm = torch.sqrt(torch.where(over, n2, torch.ones_like(n2)))
    return torch.where(over, 2 * d * r / norm, 2 * r)


def bias_loss(cfg: MemoryConfig, r: torch.Tensor, thr: Optional[torch.Tensor]) -> torch.Tensor:
    """ℓ(r) summed over the tokens of r (..., n, d) and its batch dimensions (§11.2)."""
    if cfg.bias == "l2":
        return (r * r).sum()
    if cfg.bias == "lp":
        return ((r * r + float(cfg.bias_eps)) ** (float(cfg.bias_p) / 2)).sum()
    n2, over, d = _over_threshold(r, thr)
    big = r.abs().sum(dim=-1, keepdim=True) if cfg.bias == "huber" else torch.sqrt(torch.where(over, n2, torch.ones_like(n2)))
    return torch.where(over, 2 * d * big - d * d, n2).sum()


def inner_signal(cfg: MemoryConfig, z: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 gain: Optional[torch.Tensor], thr: Optional[torch.Tensor] = None) -> torch.Tensor:
    """δ_L = ∂ℓ(M(k) − v)/∂z_L through the read-out (§1, §8.3, §11), as a differentiable expression;
    thr: δ_t (..., n) with the huber biases."""
    e = bias_gradient(cfg, readout(cfg, z, k, gain) - v, thr)
    if not cfg.output_norm:
        return e
    zhat, rsigma = _layer_norm(z, cfg.norm_eps)
    g = _gain(gain) * e
    return (g - g.mean(dim=-1, keepdim=True) - zhat * (g * zhat).mean(dim=-1, keepdim=True)) * rsigma


def _t(w: torch.Tensor) -> torch.Tensor:
    return w.transpose(-1, -2)


def mlp_forward(cfg: MemoryConfig, w: List[torch.Tensor], x: torch.Tensor):
    """a[0] = x, z[l] = a[l] W_lᵀ, a[l+1] = φ(z[l]); returns (a, z), L entries each."""
    a, z = [x], []
    for l in range(cfg.depth):
        z.append(torch.matmul(a[l], _t(w[l])))
        if l + 1 < cfg.depth:
            a.append(phi(cfg.activation, z[l]))
    return a, z


def memory_apply(cfg: MemoryConfig, w: List[torch.Tensor], x: torch.Tensor,
                 gain: Optional[torch.Tensor]) -> torch.Tensor:
    """M_Θ on every row of x (..., T, d): retrieval without update (M*, Eq 15)."""
    _, z = mlp_forward(cfg, w, x)
    return readout(cfg, z[-1], x, gain)


def inner_loss(cfg: MemoryConfig, w: List[torch.Tensor], k: torch.Tensor, v: torch.Tensor,
               gain: Optional[torch.Tensor], threshold: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ_t ℓ(M(k_t) − v_t) over the rows (summed over batch dimensions too): ‖·‖² (Eq 12, no ½)
    with the l2 bias; threshold δ_t (..., T) with the huber biases."""
    return bias_loss(cfg, memory_apply(cfg, w, k, gain) - v, threshold)


def key_path(cfg: MemoryConfig, w0: List[torch.Tensor], k, v, gain, thr=None):
    """The key path at weights w0: activations a_{l-1} and inner-gradient signals δ_l (§1);
    token i's inner gradient for layer l is δ_{l,i} a_{l-1,i}ᵀ."""
    a, z = mlp_forward(cfg, w0, k)
    delta = [None] * cfg.depth
    delta[-1] = inner_signal(cfg, z[-1], k, v, gain, thr)
    for l in range(cfg.depth - 1, 0, -1):
        delta[l - 1] = torch.matmul(delta[l], w0[l]) * dphi(cfg.activation, z[l - 1])
    return a, delta


# --- the state -------------------------------------------------------------------------------

@dataclass
class MemoryState:
    """Θ, S and the chunk bookkeeping of one memory per batch entry (C++ ``MemoryState``).

    weights[l], momentum[l]: (..., n_l, n_{l-1}); chunk_start: the chunk-start weights Θ⁰ when
    the position is inside a chunk, else None; position: tokens written since the state was made."""

    weights: List[torch.Tensor]
    momentum: List[torch.Tensor]
    chunk_start: Optional[List[torch.Tensor]] = None
    position: int = 0

    def detach(self) -> "MemoryState":
        return MemoryState([w.detach() for w in self.weights], [s.detach() for s in self.momentum],
                           None if self.chunk_start is None else [c.detach() for c in self.chunk_start],
                           self.position)


def make_memory_state(weights: List[torch.Tensor]) -> MemoryState:
    return MemoryState(list(weights), [torch.zeros_like(w) for w in weights], None, 0)


# --- the kernel (§2-3) -----------------------------------------------------------------------

def _decay_products(g: torch.Tensor) -> torch.Tensor:
    """R[..., j, i] = Π_{t=i+1}^{j} g_t for j >= i (1 on the diagonal), by products only; entries
    with j < i are 1 and must be masked by the caller."""
    n = g.shape[-1]
    idx = torch.arange(n, device=g.device)
    below = (idx[:, None] > idx[None, :])  # j > i
    e = torch.where(below, g.unsqueeze(-1).expand(*g.shape, n), torch.ones((), dtype=g.dtype, device=g.device))
    return torch.cumprod(e, dim=-2)


def chunk_coefficients(alpha: torch.Tensor, eta: torch.Tensor, theta: torch.Tensor):
    """The products-only coefficients of one sub-chunk (§3.1), for gates (..., n):
    β (..., n), c (..., n), A (..., n, n) with A[j, i] = A_{ji} (0 above the diagonal),
    s_last (..., n) = θ_i P_{n,i}, p_n0 (...)."""
    n = alpha.shape[-1]
    keep = 1 - alpha
    lower = torch.tril(torch.ones(n, n, dtype=torch.bool, device=alpha.device))
    zero = torch.zeros((), dtype=alpha.dtype, device=alpha.device)
    p = torch.where(lower, _decay_products(eta), zero)      # P_{ji}, tokens i..j
    f = torch.where(lower, _decay_products(keep), zero)     # Π_{s=r+1}^{j} (1 − α_s)
    p0 = torch.cumprod(eta, dim=-1)                          # P_{j0}
    beta = torch.cumprod(keep, dim=-1)
    c = torch.matmul(f, p0.unsqueeze(-1)).squeeze(-1)
    a = torch.matmul(f, p) * theta.unsqueeze(-2)
    s_last = theta * p[..., n - 1, :]
    return beta, c, a, s_last, p0[..., n - 1]


def clamp_steps(cfg: MemoryConfig, a, delta, theta: torch.Tensor) -> torch.Tensor:
    """θ_i · min(1, c / ‖u_i‖) with ‖u_i‖² = Σ_l ‖δ_{l,i}‖² ‖a_{l-1,i}‖² (§8.2); θ when off."""
    if not cfg.surprise_clamp > 0:
        return theta
    g2 = sum((d * d).sum(dim=-1) * (x * x).sum(dim=-1) for d, x in zip(delta, a))
    c = float(cfg.surprise_clamp)
    over = g2 > c * c
    # sqrt only where it is used, so that its derivative is never evaluated at 0
    safe = torch.where(over, g2, torch.ones_like(g2))
    return torch.where(over, theta * (c / torch.sqrt(safe)), theta)


def _subchunk(cfg: MemoryConfig, w, s, w0, k, v, q, alpha, eta, theta, gain, thr):
    L = cfg.depth
    a, delta = key_path(cfg, w0, k, v, gain, thr)
    theta = clamp_steps(cfg, a, delta, theta)
    beta, c, acoef, s_last, p_n0 = chunk_coefficients(alpha, eta, theta)
    n = k.shape[-2]
    abar = q
    zbar = None
    for l in range(L):
        gram = torch.matmul(abar, _t(a[l]))  # [j, i] = ā_j · a_i
        zbar = (beta.unsqueeze(-1) * torch.matmul(abar, _t(w[l])) + c.unsqueeze(-1) * torch.matmul(abar, _t(s[l]))
                - torch.matmul(gram * acoef, delta[l]))
        if l + 1 < L:
            abar = phi(cfg.activation, zbar)
    y = readout(cfg, zbar, q, gain)
    a_last = acoef[..., n - 1, :]
    bn = beta[..., n - 1, None, None]
    cn = c[..., n - 1, None, None]
    pn = p_n0[..., None, None]
    new_w, new_s = [], []
    for l in range(L):
        dt = _t(delta[l])
        new_w.append(bn * w[l] + cn * s[l] - torch.matmul(dt, a_last.unsqueeze(-1) * a[l]))
        new_s.append(pn * s[l] - torch.matmul(dt, s_last.unsqueeze(-1) * a[l]))
    return y, new_w, new_s


def memory_forward(cfg: MemoryConfig, chunk_size: int, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor,
                   alpha: torch.Tensor, eta: torch.Tensor, theta: torch.Tensor, state: MemoryState,
                   gain: Optional[torch.Tensor] = None, threshold: Optional[torch.Tensor] = None):
    """Writes T tokens into the memory and reads T outputs (§2-3); returns (y (..., T, d), new state).
    With the huber biases, threshold holds δ_t > 0 (..., T) (§11).

    Chunks of ``chunk_size`` tokens are aligned to ``state.position``; a token reads the weights
    after its own write; a call may start or end inside a chunk (the state keeps Θ⁰)."""
    where = "titans_torch.memory_forward"
    b = int(chunk_size)
    if b < 1:
        raise ConfigError(f"{where}: chunk_size is {chunk_size}, expected >= 1")
    if k.shape[-1] != cfg.dim or v.shape != k.shape or q.shape != k.shape:
        raise ValueError(f"{where}: k, v, q have shapes {tuple(k.shape)}, {tuple(v.shape)}, {tuple(q.shape)}, "
                         f"expected the same shape (..., T, {cfg.dim})")
    T = k.shape[-2]
    for name, g in (("alpha", alpha), ("eta", eta), ("theta", theta)):
        if g.shape != k.shape[:-1]:
            raise ValueError(f"{where}: {name} has shape {tuple(g.shape)}, expected {tuple(k.shape[:-1])}")
    if cfg.output_norm and gain is None:
        raise ValueError(f"{where}: the config has output_norm, so gain (..., {cfg.dim}) is required")
    if uses_threshold(cfg.bias):
        if threshold is None or threshold.shape != k.shape[:-1]:
            got = "none" if threshold is None else f"shape {tuple(threshold.shape)}"
            raise ValueError(f"{where}: the {cfg.bias} bias needs threshold {tuple(k.shape[:-1])}, got {got}")
        if not bool((threshold > 0).all()):
            raise ValueError(f"{where}: threshold has a value <= 0 (or NaN); the {cfg.bias} bias needs δ_t > 0")
    pos = state.position
    if (pos % b == 0) != (state.chunk_start is None):
        raise ValueError(f"{where}: state.chunk_start is {'missing' if state.chunk_start is None else 'present'} "
                         f"at position {pos} with chunk_size {b}: the state was made with another chunk size")
    w, s, cs = list(state.weights), list(state.momentum), state.chunk_start
    ys = []
    t = 0
    while t < T:
        off = pos % b
        n = min(T - t, b - off)
        w0 = w if off == 0 else cs
        sl = slice(t, t + n)
        y, nw, ns = _subchunk(cfg, w, s, w0, k[..., sl, :], v[..., sl, :], q[..., sl, :],
                              alpha[..., sl], eta[..., sl], theta[..., sl], gain,
                              threshold[..., sl] if uses_threshold(cfg.bias) else None)
        if off == 0 and off + n < b:
            cs = w
        if off + n == b:
            cs = None
        w, s = nw, ns
        ys.append(y)
        pos += n
        t += n
    y = torch.cat(ys, dim=-2) if ys else q.new_zeros(q.shape)
    return y, MemoryState(w, s, cs, pos)
