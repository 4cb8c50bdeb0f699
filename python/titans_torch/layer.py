# SPDX-License-Identifier: Apache-2.0
"""The neural memory layer (docs/MATH.md §4): projections, causal depthwise convolutions,
ℓ2-normalised keys and queries, per-token per-head gates, H memories, gated RMS-normalised output.

Activations are ``(B, T, D)`` (batch, tokens, features); parameters have the C++ names and
shapes (``w_k`` is (D, D) acting as ``W x``, ``conv_k`` is (D, K) with column K−1 the current
token, gate biases are (H, 1), ``memory_init.w{l}`` is (H·n_l, n_{l−1}) with head h in rows
[h·n_l, (h+1)·n_l)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from .memory import (ConfigError, MemoryConfig, MemoryState, _check_int, _check_real, make_memory_state,
                     memory_apply, memory_forward, uses_threshold)


@dataclass
class NeuralMemoryConfig:
    """C++ ``titans::NeuralMemoryConfig``, with the same defaults (the bounded deep memory)."""

    dim: int = 256
    heads: int = 4
    depth: int = 2
    expansion: int = 4
    activation: str = "silu"
    residual: bool = True
    output_norm: bool = True
    surprise_clamp: float = 250.0
    chunk_size: int = 16
    conv_kernel: int = 4
    theta_max: float = 1.0
    eta_max: float = 0.95  # η = η_max σ(·), in [0, 1]; 0: no momentum
    alpha_max: float = 1.0  # α = α_max σ(·), in [0, 1]; 0: no forgetting
    per_chunk_gates: bool = False
    norm_eps: float = 1e-6
    bias: str = "l2"  # the attentional bias (docs/MATH.md §11): l2, huber, huber_radial or lp
    bias_p: float = 3.0  # p >= 1 of the lp bias
    bias_eps: float = 1e-6  # ε > 0 of the lp bias
    threshold_max: float = 4.0  # δ_max of the huber biases: δ_t = δ_max σ(w_delta x_t + b_delta) per head

    def head_dim(self) -> int:
        return self.dim // self.heads if self.heads > 0 else 0

    def memory(self) -> MemoryConfig:
        return MemoryConfig(dim=self.head_dim(), depth=self.depth, expansion=self.expansion,
                            activation=self.activation, residual=self.residual, output_norm=self.output_norm,
                            norm_eps=self.norm_eps, surprise_clamp=self.surprise_clamp, bias=self.bias,
                            bias_p=self.bias_p, bias_eps=self.bias_eps)

    def validate(self, where: str = "titans_torch.NeuralMemoryConfig") -> None:
        _check_int(where, "dim", self.dim, 1, 1 << 16)
        _check_int(where, "heads", self.heads, 1, self.dim)
        if self.dim % self.heads != 0:
            raise ConfigError(f"{where}: heads ({self.heads}) does not divide dim ({self.dim})")
        _check_int(where, "chunk_size", self.chunk_size, 1, 1 << 16)
        _check_int(where, "conv_kernel", self.conv_kernel, 1, 1024)
        _check_real(where, "theta_max", self.theta_max)
        _check_real(where, "norm_eps", self.norm_eps, positive=True)
        _check_real(where, "threshold_max", self.threshold_max, positive=True)
        for name in ("eta_max", "alpha_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (0 <= value <= 1):  # also rejects NaN
                raise ConfigError(f"{where}: {name} is {value!r}, expected a value in [0, 1]")
        self.memory().validate(where)


@dataclass
class NeuralMemoryState:
    """Per-sequence state of a layer, for a batch: every head's memory (batch dims (B, H)), the
    projected k, v, q of the last K−1 tokens (three (B, K−1, D) tensors), the gate
    pre-activations of the chunk in progress ((B, 3, H): α, η, θ), and the position."""

    memory: MemoryState
    conv_tail: List[torch.Tensor]
    chunk_gates: torch.Tensor
    position: int = 0

    def detach(self) -> "NeuralMemoryState":
        return NeuralMemoryState(self.memory.detach(), [c.detach() for c in self.conv_tail],
                                 self.chunk_gates.detach(), self.position)


def l2_normalize(x: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    """s / sqrt(‖s‖² + ε) per head over the last dimension (D = heads·d)."""
    shape = x.shape
    xs = x.reshape(*shape[:-1], heads, shape[-1] // heads)
    xs = xs / torch.sqrt((xs * xs).sum(dim=-1, keepdim=True) + eps)
    return xs.reshape(shape)


def rms_normalize(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + ε) per group of features (one group: the whole feature vector)."""
    shape = x.shape
    xs = x.reshape(*shape[:-1], groups, shape[-1] // groups)
    xs = xs / torch.sqrt((xs * xs).mean(dim=-1, keepdim=True) + eps)
    return xs.reshape(shape)


def silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + torch.exp(-x))


def _normal(gen: torch.Generator, shape, sd: float, dtype) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * sd).to(dtype)


class NeuralMemory(nn.Module):
    """The layer. ``forward(x, state=None) -> (o, state)``: x (B, T, D); a state of None is a
    fresh one (every head at Θ_init, S = 0, zero convolution history)."""

    def __init__(self, cfg: NeuralMemoryConfig, dtype=torch.float32, device=None, seed: int = 0):
        super().__init__()
        cfg.validate("titans_torch.NeuralMemory")
        self.cfg = cfg
        self.mem = cfg.memory()
        D, H, K, m = cfg.dim, cfg.heads, cfg.conv_kernel, self.mem
        z = lambda *s: nn.Parameter(torch.zeros(*s, dtype=dtype, device=device))
        self.w_k, self.w_v, self.w_q = z(D, D), z(D, D), z(D, D)
        self.conv_k, self.conv_v, self.conv_q = z(D, K), z(D, K), z(D, K)
        self.w_alpha, self.b_alpha = z(H, D), z(H, 1)
        self.w_eta, self.b_eta = z(H, D), z(H, 1)
        self.w_theta, self.b_theta = z(H, D), z(H, 1)
        if uses_threshold(cfg.bias):  # the huber biases' threshold projection (docs/MATH.md §11.5)
            self.w_delta, self.b_delta = z(H, D), z(H, 1)
        else:
            self.w_delta = self.b_delta = None
        self.memory_init = nn.ParameterDict(
            {f"w{l + 1}": z(H * m.layer_out(l), m.layer_in(l)) for l in range(m.depth)})
        if cfg.output_norm:
            self.memory_gain = z(D, 1)
        else:
            self.memory_gain = None
        self.w_gate = z(D, D)
        self.norm_gain = z(D, 1)
        self.w_out = z(D, D)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """The C++ init's distributions (docs/MATH.md §4), drawn from torch's generator: the
        same distributions, not the same numbers as ``NeuralMemory<S>::init``."""
        gen = torch.Generator().manual_seed(int(seed))
        cfg, m = self.cfg, self.mem
        D, H, K = cfg.dim, cfg.heads, cfg.conv_kernel
        dt = self.w_k.dtype
        proj = 1 / math.sqrt(D)
        for p in (self.w_k, self.w_v, self.w_q):
            p.copy_(_normal(gen, (D, D), proj, dt))
        for p in (self.conv_k, self.conv_v, self.conv_q):
            c = _normal(gen, (D, K), 0.02, dt)
            c[:, K - 1] += 1
            p.copy_(c)
        for p in (self.w_alpha, self.w_eta, self.w_theta):
            p.copy_(_normal(gen, (H, D), 0.02, dt))
        self.b_alpha.fill_(-8.0)
        self.b_eta.fill_(1.0)
        hidden = m.layer_in(m.depth - 1) if m.depth > 1 else m.dim
        s = min(0.12, 1.0 / hidden)
        self.b_theta.fill_(math.log(s / (1 - s)))
        if self.w_delta is not None:
            self.w_delta.copy_(_normal(gen, (H, D), 0.02, dt))
            self.b_delta.fill_(0.0)  # δ ≈ δ_max / 2
        for l in range(m.depth):
            w = self.memory_init[f"w{l + 1}"]
            w.copy_(_normal(gen, tuple(w.shape), 1 / math.sqrt(m.layer_in(l)), dt))
        if self.memory_gain is not None:
            self.memory_gain.fill_(1.0)
        self.w_gate.copy_(_normal(gen, (D, D), proj, dt))
        self.norm_gain.fill_(1.0)
        self.w_out.copy_(_normal(gen, (D, D), proj, dt))

    # --- helpers ---------------------------------------------------------------------------
    def _init_weights(self, batch: int) -> List[torch.Tensor]:
        H, m = self.cfg.heads, self.mem
        out = []
        for l in range(m.depth):
            w = self.memory_init[f"w{l + 1}"].reshape(H, m.layer_out(l), m.layer_in(l))
            out.append(w.unsqueeze(0).expand(batch, *w.shape))
        return out

    def head_gain(self) -> Optional[torch.Tensor]:
        """γ per head, (H, d), or None without output_norm."""
        if self.memory_gain is None:
            return None
        return self.memory_gain.reshape(self.cfg.heads, self.mem.dim)

    def initial_state(self, batch: int = 1) -> NeuralMemoryState:
        D, H, K = self.cfg.dim, self.cfg.heads, self.cfg.conv_kernel
        ref = self.w_k
        tail = [ref.new_zeros(batch, K - 1, D) for _ in range(3)]
        return NeuralMemoryState(make_memory_state(self._init_weights(batch)), tail, ref.new_zeros(batch, 3, H), 0)

    def _check_input(self, where: str, x: torch.Tensor, state: Optional[NeuralMemoryState]) -> None:
        if x.dim() != 3 or x.shape[-1] != self.cfg.dim:
            raise ValueError(f"{where}: x has shape {tuple(x.shape)}, expected (B, T, {self.cfg.dim})")
        if state is not None:
            B = x.shape[0]
            if state.chunk_gates.shape != (B, 3, self.cfg.heads) or len(state.conv_tail) != 3:
                raise ValueError(f"{where}: the state does not belong to this layer and a batch of {B}")

    def _inputs(self, x: torch.Tensor, state: NeuralMemoryState):
        """Keys, values, queries (B, T, D) and gates (B, T, H) for x, continuing the state's
        convolution history and chunk gates; also the new tail and chunk gates."""
        cfg = self.cfg
        H, K, T = cfg.heads, cfg.conv_kernel, x.shape[1]
        outs, tails = [], []
        for w, conv, tail in ((self.w_k, self.conv_k, state.conv_tail[0]), (self.w_v, self.conv_v, state.conv_tail[1]),
                              (self.w_q, self.conv_q, state.conv_tail[2])):
            ext = torch.cat([tail, torch.matmul(x, w.t())], dim=1)  # (B, K−1+T, D)
            o = conv[:, K - 1] * ext[:, K - 1:]
            for j in range(K - 1):
                o = o + conv[:, j] * ext[:, j:j + T]
            outs.append(silu(o))
            tails.append(ext[:, ext.shape[1] - (K - 1):])
        k = l2_normalize(outs[0], H, cfg.norm_eps)
        v = outs[1]
        q = l2_normalize(outs[2], H, cfg.norm_eps)
        pre = [torch.matmul(x, w.t()) + b[:, 0] for w, b in
               ((self.w_alpha, self.b_alpha), (self.w_eta, self.b_eta), (self.w_theta, self.b_theta))]
        chunk_gates = state.chunk_gates
        if cfg.per_chunk_gates:
            b = cfg.chunk_size
            source, src = -1, []
            for t in range(T):
                if (state.position + t) % b == 0:
                    source = t
                src.append(source + 1)  # index into [state's gates, this call's tokens]
            idx = torch.tensor(src, dtype=torch.long, device=x.device)
            new = []
            for g in range(3):
                ext = torch.cat([state.chunk_gates[:, g:g + 1], pre[g]], dim=1)  # (B, 1+T, H)
                new.append(ext[:, source + 1])
                pre[g] = ext.index_select(1, idx)
            chunk_gates = torch.stack(new, dim=1)
        alpha = cfg.alpha_max * torch.sigmoid(pre[0])
        eta = cfg.eta_max * torch.sigmoid(pre[1])
        theta = cfg.theta_max * torch.sigmoid(pre[2])
        return k, v, q, alpha, eta, theta, tails, chunk_gates

    def threshold(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """δ_t = δ_max σ(w_delta x_t + b_delta) (B, T, H) with the huber biases, else None: per
        token always, also with per_chunk_gates (docs/MATH.md §11.5)."""
        if self.w_delta is None:
            return None
        return self.cfg.threshold_max * torch.sigmoid(torch.matmul(x, self.w_delta.t()) + self.b_delta[:, 0])

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, H, T, d)
        B, T, _ = t.shape
        return t.reshape(B, T, self.cfg.heads, self.mem.dim).transpose(1, 2)

    def _unheads(self, t: torch.Tensor) -> torch.Tensor:  # (B, H, T, d) -> (B, T, D)
        B, H, T, d = t.shape
        return t.transpose(1, 2).reshape(B, T, H * d)

    def output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """o = W_O (γ_o ⊙ RMSN_head(y) ⊙ σ(W_G x)); y is the memories' reads (B, T, D)."""
        g = torch.sigmoid(torch.matmul(x, self.w_gate.t()))
        n = rms_normalize(y, self.cfg.heads, self.cfg.norm_eps)
        return torch.matmul(self.norm_gain[:, 0] * (n * g), self.w_out.t())

    # --- the public calls --------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state: Optional[NeuralMemoryState] = None):
        """Reads and writes T tokens: returns (o (B, T, D), the state after them). Any split of a
        sequence into calls gives the outputs of one call."""
        self._check_input("titans_torch.NeuralMemory.forward", x, state)
        if state is None:
            state = self.initial_state(x.shape[0])
        if x.shape[1] == 0:
            return x.new_zeros(x.shape), state
        k, v, q, alpha, eta, theta, tails, chunk_gates = self._inputs(x, state)
        thr = self.threshold(x)
        y, mstate = memory_forward(self.mem, self.cfg.chunk_size, self._heads(k), self._heads(v), self._heads(q),
                                   alpha.transpose(1, 2), eta.transpose(1, 2), theta.transpose(1, 2),
                                   state.memory, self.head_gain(), None if thr is None else thr.transpose(1, 2))
        new_state = NeuralMemoryState(mstate, tails, chunk_gates, state.position + x.shape[1])
        return self.output(x, self._unheads(y)), new_state

    def read(self, x: torch.Tensor, state: Optional[NeuralMemoryState] = None) -> torch.Tensor:
        """The raw reads M*_Θ(q) (B, T, D) from the state's current weights; nothing is written."""
        self._check_input("titans_torch.NeuralMemory.read", x, state)
        if state is None:
            state = self.initial_state(x.shape[0])
        q = self._inputs(x, state)[2]
        return self._unheads(memory_apply(self.mem, state.memory.weights, self._heads(q), self.head_gain()))

    def retrieve(self, x: torch.Tensor, state: Optional[NeuralMemoryState] = None) -> torch.Tensor:
        """read() through the output path (norm, gate, projection)."""
        return self.output(x, self.read(x, state))
