# SPDX-License-Identifier: Apache-2.0
"""Causal multi-head softmax attention with rotary embeddings and persistent tokens (docs/MATH.md §6).

Parameters ``w_q, w_k, w_v, w_o`` are (D, D) acting as ``W x``. Activations are (B, T, D).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from .layer import _normal
from .memory import ConfigError, _check_int


@dataclass
class AttentionConfig:
    dim: int = 256
    heads: int = 4
    window: int = 0  # w >= 1: a token sees itself and the w − 1 before it; 0: full causal
    rope_base: float = 10000.0

    def head_dim(self) -> int:
        return self.dim // self.heads if self.heads > 0 else 0

    def validate(self, where: str = "titans_torch.AttentionConfig") -> None:
        _check_int(where, "dim", self.dim, 1, 1 << 16)
        _check_int(where, "heads", self.heads, 1, self.dim)
        if self.dim % self.heads != 0:
            raise ConfigError(f"{where}: heads ({self.heads}) does not divide dim ({self.dim})")
        if self.head_dim() % 2 != 0:
            raise ConfigError(f"{where}: head width dim / heads = {self.head_dim()} is odd; "
                              "rotary embeddings need an even head width")
        _check_int(where, "window", self.window, 0, 1 << 24)
        if not (math.isfinite(self.rope_base) and self.rope_base > 1):
            raise ConfigError(f"{where}: rope_base is {self.rope_base}, expected a finite value > 1")


def rope(x: torch.Tensor, pos: Sequence[int], base: float) -> torch.Tensor:
    """Rotates each head's pairs (i, i + d_h/2) of token t by pos[t]·base^(−2i/d_h); x is
    (B, H, T, d_h). The angles are formed in double precision, as in the C++ code."""
    dh = x.shape[-1]
    half = dh // 2
    i = torch.arange(half, dtype=torch.float64, device=x.device)
    freq = torch.pow(torch.tensor(float(base), dtype=torch.float64, device=x.device), -2.0 * i / dh)
    p = torch.as_tensor(list(pos), dtype=torch.float64, device=x.device)
    ang = p[:, None] * freq[None, :]
    c, s = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)


def causal_mask(T: int, window: int, device=None) -> torch.Tensor:
    """(T, T) bool: query t sees key s when s <= t (and s > t − w with a window w)."""
    i = torch.arange(T, device=device)
    m = i[None, :] <= i[:, None]
    if window > 0:
        m = m & (i[None, :] > i[:, None] - window)
    return m


@dataclass
class AttentionState:
    """KV cache of a batch: the keys (already rotated) and values a later query may still see,
    (B, H, n, d_h) each, oldest first (at most w − 1 with a window); the position."""

    k: torch.Tensor
    v: torch.Tensor
    position: int = 0

    def detach(self) -> "AttentionState":
        return AttentionState(self.k.detach(), self.v.detach(), self.position)


class Attention(nn.Module):
    def __init__(self, cfg: AttentionConfig, dtype=torch.float32, device=None, seed: int = 0):
        super().__init__()
        cfg.validate("titans_torch.Attention")
        self.cfg = cfg
        D = cfg.dim
        self.w_q = nn.Parameter(torch.zeros(D, D, dtype=dtype, device=device))
        self.w_k = nn.Parameter(torch.zeros(D, D, dtype=dtype, device=device))
        self.w_v = nn.Parameter(torch.zeros(D, D, dtype=dtype, device=device))
        self.w_o = nn.Parameter(torch.zeros(D, D, dtype=dtype, device=device))
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(int(seed))
        sd = 1 / math.sqrt(self.cfg.dim)
        for p in (self.w_q, self.w_k, self.w_v, self.w_o):
            p.copy_(_normal(gen, tuple(p.shape), sd, p.dtype))

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, H, T, dh)
        B, T, _ = t.shape
        return t.reshape(B, T, self.cfg.heads, self.cfg.head_dim()).transpose(1, 2)

    def _keys(self, persistent: Optional[torch.Tensor]):
        if persistent is None or persistent.shape[1] == 0:
            return None, None
        return (self._split(torch.matmul(persistent, self.w_k.t())),
                self._split(torch.matmul(persistent, self.w_v.t())))

    def _softmax_read(self, q, k, v, kp, vp, visible):
        """softmax(q kᵀ / √d_h) v per head over the persistent keys (always visible) and the
        keys `visible` (Tq, n_keys) allows; q (B, H, Tq, d_h) → (B, H, Tq, d_h)."""
        if kp is not None:
            k, v = torch.cat([kp, k], dim=2), torch.cat([vp, v], dim=2)
            visible = torch.cat([torch.ones(visible.shape[0], kp.shape[2], dtype=torch.bool,
                                            device=visible.device), visible], dim=1)
        s = torch.matmul(q, k.transpose(-1, -2)) * (1 / math.sqrt(self.cfg.head_dim()))
        return torch.matmul(torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1), v)

    def _merge(self, a: torch.Tensor) -> torch.Tensor:  # (B, H, T, dh) -> W_O a, (B, T, D)
        B, H, T, dh = a.shape
        return torch.matmul(a.transpose(1, 2).reshape(B, T, H * dh), self.w_o.t())

    def attend(self, xq: torch.Tensor, qpos: Sequence[int], xkv: torch.Tensor, kpos: Sequence[int],
               persistent: Optional[torch.Tensor], visible: torch.Tensor, cached=None):
        """The general form: queries xq (B, Tq, D) at rotary positions qpos; keys and values from
        the persistent tokens (B, N_p, D) (no position, seen by every query), then the `cached`
        (k, v) pair ((B, H, n, d_h) each, k already rotated) or None, then xkv (B, Tkv, D) at
        positions kpos; ``visible`` (Tq, n + Tkv) says which of the latter each query sees.
        Returns (W_O·attention (B, Tq, D), the new keys (rotated) and values (B, H, Tkv, d_h))."""
        cfg = self.cfg
        q = rope(self._split(torch.matmul(xq, self.w_q.t())), qpos, cfg.rope_base)
        k = rope(self._split(torch.matmul(xkv, self.w_k.t())), kpos, cfg.rope_base)
        v = self._split(torch.matmul(xkv, self.w_v.t()))
        km, vm = (k, v) if cached is None else (torch.cat([cached[0], k], dim=2), torch.cat([cached[1], v], dim=2))
        kp, vp = self._keys(persistent)
        return self._merge(self._softmax_read(q, km, vm, kp, vp, visible)), k, v

    def initial_state(self, batch: int = 1) -> AttentionState:
        H, dh = self.cfg.heads, self.cfg.head_dim()
        z = self.w_q.new_zeros(batch, H, 0, dh)
        return AttentionState(z, z.clone(), 0)

    def causal(self, x: torch.Tensor, persistent: Optional[torch.Tensor] = None,
               state: Optional[AttentionState] = None, block: int = 0):
        """Causal attention over T new tokens continuing `state` (None: a fresh one): token t at
        absolute position p = state.position + t sees the persistent tokens (B, N_p, D) and the
        tokens at p − w + 1 … p (every earlier one without a window). Returns (out (B, T, D),
        the state after). With ``block`` > 0 the queries go in blocks of that many, each scored
        against the keys it can see only (O(T·(w + block)) memory with a window); the result is
        the same."""
        B, T, D = x.shape
        cfg = self.cfg
        w = cfg.window
        if state is None:
            state = self.initial_state(B)
        pos0, n = state.position, state.k.shape[2]
        pos = range(pos0, pos0 + T)
        q = rope(self._split(torch.matmul(x, self.w_q.t())), pos, cfg.rope_base)
        k = torch.cat([state.k, rope(self._split(torch.matmul(x, self.w_k.t())), pos, cfg.rope_base)], dim=2)
        v = torch.cat([state.v, self._split(torch.matmul(x, self.w_v.t()))], dim=2)
        kp, vp = self._keys(persistent)
        step = block if block > 0 else max(T, 1)
        outs = []
        for i0 in range(0, T, step):
            i1 = min(T, i0 + step)
            lo = max(0, n + i0 - w + 1) if w > 0 else 0
            t = torch.arange(n + i0, n + i1, device=x.device)  # the queries' main-key indices
            m = torch.arange(lo, n + i1, device=x.device)
            visible = m[None, :] <= t[:, None]
            if w > 0:
                visible = visible & (m[None, :] > t[:, None] - w)
            outs.append(self._softmax_read(q[:, :, i0:i1], k[:, :, lo:n + i1], v[:, :, lo:n + i1], kp, vp, visible))
        out = self._merge(torch.cat(outs, dim=2)) if outs else x.new_zeros(x.shape)
        keep = min(n + T, w - 1) if w > 0 else n + T
        return out, AttentionState(k[:, :, n + T - keep:], v[:, :, n + T - keep:], pos0 + T)

    def forward(self, x: torch.Tensor, persistent: Optional[torch.Tensor] = None, block: int = 0) -> torch.Tensor:
        """causal() over a whole sequence from position 0."""
        return self.causal(x, persistent, None, block)[0]
