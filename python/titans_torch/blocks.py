# SPDX-License-Identifier: Apache-2.0
"""The Titans blocks (docs/MATH.md §5-6): LMM, MAC, MAG, MAL and SWA, each in the pre-norm
residual wrapper with a SwiGLU feed-forward.

``forward(x)`` runs a whole sequence (B, T, D) from a fresh state; ``run(x, state)`` continues a
state and returns the state after, so a sequence can be fed in any split, down to one token. Its tensors have the C++ names (``norm_mixer``, ``persistent``,
``attention.w_q``, ``memory.w_k``, ``retrieve.w`` or ``retrieve.queries``, ``gate.y_gain``, ``ffn.w1``, ...).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from .attention import Attention, AttentionConfig, AttentionState
from .layer import NeuralMemory, NeuralMemoryConfig, NeuralMemoryState, _normal, l2_normalize, rms_normalize, silu
from .memory import ConfigError, _check_int, _check_real, memory_apply

BLOCK_KINDS = ("lmm", "mac", "mag", "mal", "swa")


@dataclass
class BlockConfig:
    """C++ ``titans::BlockConfig``. ``attention_block`` (queries per block of the sliding-window
    attention) and ``checkpoint_every`` (the C++ backward's recomputation) are speed and memory
    knobs that do not change the math; the latter is kept only so that a file round-trips."""

    kind: str = "mac"
    dim: int = 256
    attention_heads: int = 4
    window: int = 64
    segment: int = 64
    persistent: int = 4
    ffn_hidden: int = 0
    rope_base: float = 10000.0
    attention_block: int = 64
    norm_eps: float = 1e-6
    memory: NeuralMemoryConfig = field(default_factory=NeuralMemoryConfig)
    checkpoint_every: int = 1
    # N_l, MAC only: 0 = a retrieved token per segment token, interleaved; > 0 = Figure 3a, N_l
    # memory tokens from learned queries, a prefix every token of the segment sees
    memory_tokens: int = 0

    def has_memory(self) -> bool:
        return self.kind != "swa"

    def has_attention(self) -> bool:
        return self.kind != "lmm"

    def has_gate(self) -> bool:
        return self.kind in ("mac", "mag")

    def has_retrieve_queries(self) -> bool:
        return self.kind == "mac" and self.memory_tokens > 0

    def ffn_width(self) -> int:
        return self.ffn_hidden if self.ffn_hidden > 0 else ((8 * self.dim + 2) // 3 + 7) // 8 * 8

    def attention(self) -> AttentionConfig:
        return AttentionConfig(dim=self.dim, heads=self.attention_heads,
                               window=0 if self.kind == "mac" else self.window, rope_base=self.rope_base)

    def validate(self, where: str = "titans_torch.BlockConfig") -> None:
        if self.kind not in BLOCK_KINDS:
            raise ConfigError(f"{where}: unknown block kind {self.kind!r}, expected one of {', '.join(BLOCK_KINDS)}")
        _check_int(where, "dim", self.dim, 1, 1 << 16)
        _check_int(where, "window", self.window, 1, 1 << 24)
        _check_int(where, "segment", self.segment, 1, 1 << 24)
        _check_int(where, "persistent (N_p)", self.persistent, 0, 1 << 16)
        _check_int(where, "checkpoint_every", self.checkpoint_every, 1, 1 << 16)
        _check_int(where, "ffn_hidden", self.ffn_hidden, 0, 1 << 20)
        _check_int(where, "memory_tokens (N_l)", self.memory_tokens, 0, 1 << 16)
        _check_int(where, "attention_block", self.attention_block, 1, 1 << 16)
        _check_real(where, "norm_eps", self.norm_eps, positive=True)
        if self.has_attention():
            _check_int(where, "attention_heads", self.attention_heads, 1, self.dim)
            if self.dim % self.attention_heads != 0:
                raise ConfigError(f"{where}: attention_heads ({self.attention_heads}) does not divide dim ({self.dim})")
            self.attention().validate(where)
        if self.has_memory():
            if self.memory.dim != self.dim:
                raise ConfigError(f"{where}: memory.dim ({self.memory.dim}) differs from dim ({self.dim})")
            self.memory.validate(where)


class _Tensors(nn.Module):
    """A named group of parameters (gives state_dict names such as ``ffn.w1``)."""

    def __init__(self, shapes, dtype, device):
        super().__init__()
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device)))


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """g ⊙ x / sqrt(mean(x²) + ε) over the features; gain is (D, 1)."""
    return gain[:, 0] * rms_normalize(x, 1, eps)


class Block(nn.Module):
    def __init__(self, cfg: BlockConfig, dtype=torch.float32, device=None, seed: int = 0):
        super().__init__()
        cfg.validate("titans_torch.Block")
        self.cfg = cfg
        D, F, Np = cfg.dim, cfg.ffn_width(), cfg.persistent
        z = lambda *s: nn.Parameter(torch.zeros(*s, dtype=dtype, device=device))
        self.norm_mixer = z(D, 1)
        self.persistent = z(D, Np)
        self.attention = Attention(cfg.attention(), dtype, device) if cfg.has_attention() else None
        self.memory = NeuralMemory(cfg.memory, dtype, device) if cfg.has_memory() else None
        queries = {"queries": (D, cfg.memory_tokens)} if cfg.has_retrieve_queries() else {"w": (D, D)}
        self.retrieve = _Tensors({**queries, "gain": (D, 1)}, dtype, device) if cfg.kind == "mac" else None
        self.gate = _Tensors({"y_gain": (D, 1), "m_gain": (D, 1)}, dtype, device) if cfg.has_gate() else None
        self.norm_ffn = z(D, 1)
        self.ffn = _Tensors({"w1": (F, D), "w3": (F, D), "w2": (D, F)}, dtype, device)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """The C++ init's distributions (Block<S>::init), from torch's generator."""
        gen = torch.Generator().manual_seed(int(seed))
        cfg = self.cfg
        D, F = cfg.dim, cfg.ffn_width()
        dt = self.norm_mixer.dtype
        self.norm_mixer.fill_(1.0)
        self.norm_ffn.fill_(1.0)
        self.persistent.copy_(_normal(gen, (D, cfg.persistent), 1.0, dt))
        if self.attention is not None:
            self.attention.reset_parameters(seed * 7919 + 1)
        if self.memory is not None:
            self.memory.reset_parameters(seed * 7919 + 2)
        if self.gate is not None:
            self.gate.y_gain.fill_(1.0)
            self.gate.m_gain.fill_(1.0)
        if self.retrieve is not None:
            if cfg.has_retrieve_queries():
                self.retrieve.queries.copy_(_normal(gen, (D, cfg.memory_tokens), 1.0, dt))
            else:
                self.retrieve.w.copy_(_normal(gen, (D, D), 1 / math.sqrt(D), dt))
            self.retrieve.gain.fill_(1.0)
        self.ffn.w1.copy_(_normal(gen, (F, D), 1 / math.sqrt(D), dt))
        self.ffn.w3.copy_(_normal(gen, (F, D), 1 / math.sqrt(D), dt))
        self.ffn.w2.copy_(_normal(gen, (D, F), 1 / math.sqrt(F), dt))

    # --- pieces ----------------------------------------------------------------------------
    def _persistent(self, batch: int) -> torch.Tensor:  # (B, N_p, D)
        p = self.persistent.t()
        return p.unsqueeze(0).expand(batch, *p.shape)

    def _gate(self, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """y ⊗ m = RMSNorm_{gy}(y) ⊙ σ(RMSNorm_{gm}(m))."""
        eps = self.cfg.norm_eps
        return rms_norm(y, self.gate.y_gain, eps) * torch.sigmoid(rms_norm(m, self.gate.m_gain, eps))

    def _memory_primed(self, u: torch.Tensor, state: "BlockState"):
        """The memory over u, primed with [p ‖ u] on the first non-empty call from a fresh state:
        (outputs at u, outputs at p or None, the memory's state after)."""
        np_ = self.cfg.persistent
        if not state.primed and np_ > 0 and u.shape[1] > 0:
            out, ms = self.memory(torch.cat([self._persistent(u.shape[0]), u], dim=1), state.memory)
            return out[:, np_:], out[:, :np_], ms
        out, ms = self.memory(u, state.memory)
        return out, None, ms

    def _retrieval_queries(self, u: torch.Tensor) -> torch.Tensor:
        """MAC's query path before the ℓ2 norm: SiLU(W_R u) (B, n, D), or with memory tokens the
        learned queries (B, N_l, D)."""
        if self.cfg.has_retrieve_queries():
            q = self.retrieve.queries.t()
            return q.unsqueeze(0).expand(u.shape[0], *q.shape)
        return silu(torch.matmul(u, self.retrieve.w.t()))

    def _retrieve(self, q_raw: torch.Tensor, snapshot) -> torch.Tensor:
        """MAC retrieval: q = ℓ2n(q_raw) per memory head, h = γ_R ⊙ RMSN_head(M*_snapshot(q))."""
        mem = self.memory
        H, eps = mem.cfg.heads, mem.cfg.norm_eps
        q = l2_normalize(q_raw, H, eps)
        r = mem._unheads(memory_apply(mem.mem, snapshot, mem._heads(q), mem.head_gain()))
        return self.retrieve.gain[:, 0] * rms_normalize(r, H, eps)

    def _mac(self, u: torch.Tensor, state: "BlockState"):
        """Segments of C tokens aligned to the absolute position; a call may start or end inside
        a segment (the state keeps the segment's [h, u] keys and values, or its u keys and values
        with memory tokens, and the snapshot; memory tokens are recomputed from the snapshot)."""
        B, T, D = u.shape
        C = self.cfg.segment
        ms, snapshot = state.memory, state.snapshot
        ck, cv = state.attention.k, state.attention.v
        p = self._persistent(B) if self.cfg.persistent > 0 else None
        outs = []
        t = 0
        while t < T:
            in_seg = (state.position + t) % C
            n = min(T - t, C - in_seg)
            useg = u[:, t:t + n]
            h = self._retrieve(self._retrieval_queries(useg), snapshot)
            nc = ck.shape[2]
            i = torch.arange(n, device=u.device)
            if self.cfg.has_retrieve_queries():  # Figure 3a: [persistent || h] then the segment, causal
                prefix = h if p is None else torch.cat([p, h], dim=1)
                kv, kpos = useg, range(in_seg, in_seg + n)
                visible = torch.arange(nc + n, device=u.device)[None, :] <= nc + i[:, None]
            else:
                prefix = p
                kv = torch.stack([h, useg], dim=2).reshape(B, 2 * n, D)  # h_1, u_1, h_2, u_2, ...
                kpos = [in_seg + j // 2 for j in range(2 * n)]
                visible = torch.arange(nc + 2 * n, device=u.device)[None, :] <= nc + 2 * i[:, None] + 1
            y, kn, vn = self.attention.attend(useg, range(in_seg, in_seg + n), kv, kpos, prefix, visible, (ck, cv))
            z, ms = self.memory(y, ms)
            outs.append(self._gate(y, z))
            if in_seg + n == C:
                snapshot = ms.memory.weights
                ck, cv = ck[:, :, :0], cv[:, :, :0]
            else:
                ck, cv = torch.cat([ck, kn], dim=2), torch.cat([cv, vn], dim=2)
            t += n
        out = torch.cat(outs, dim=1) if outs else u.new_zeros(u.shape)
        att = AttentionState(ck, cv, state.attention.position + T)
        return out, BlockState(ms, att, snapshot, None, False, state.position + T)

    def initial_state(self, batch: int = 1) -> "BlockState":
        """A fresh state for a batch: the memory at Θ_init, empty caches, position 0."""
        ms = self.memory.initial_state(batch) if self.memory is not None else None
        att = self.attention.initial_state(batch) if self.attention is not None else None
        snap = ms.memory.weights if self.cfg.kind == "mac" else None
        return BlockState(ms, att, snap, None, False, 0)

    def _mixer(self, u: torch.Tensor, state: "BlockState"):
        kind, T = self.cfg.kind, u.shape[1]
        if kind == "mac":
            return self._mac(u, state)
        B = u.shape[0]
        p = self._persistent(B) if self.cfg.persistent > 0 else None
        blk = self.cfg.attention_block
        primed = state.primed or T > 0
        if kind == "swa":
            out, att = self.attention.causal(u, p, state.attention, blk)
            return out, BlockState(None, att, None, None, False, state.position + T)
        y, py, ms = self._memory_primed(u, state)
        if kind == "lmm":
            return y, BlockState(ms, None, None, None, primed, state.position + T)
        if kind == "mag":
            a, att = self.attention.causal(u, p, state.attention, blk)
            return self._gate(a, y), BlockState(ms, att, None, None, primed, state.position + T)
        # MAL: the memory's outputs at the persistent tokens are the attention's persistent tokens
        pys = py if py is not None else state.persistent_y
        out, att = self.attention.causal(y, pys, state.attention, blk)
        return out, BlockState(ms, att, None, pys, primed, state.position + T)

    def run(self, x: torch.Tensor, state: Optional["BlockState"] = None):
        """Runs T tokens through the block continuing `state` (None: a fresh one): returns
        (out (B, T, D), the state after). Any split of a sequence into calls gives the outputs of
        one call. Autograd follows the state into earlier calls unless it is detached
        (``state.detach()``, the C++ code's truncation at call boundaries)."""
        if x.dim() != 3 or x.shape[-1] != self.cfg.dim:
            raise ValueError(f"titans_torch.Block: x has shape {tuple(x.shape)}, expected (B, T, {self.cfg.dim})")
        if state is None:
            state = self.initial_state(x.shape[0])
        eps = self.cfg.norm_eps
        mix, state = self._mixer(rms_norm(x, self.norm_mixer, eps), state)
        x1 = x + mix
        u2 = rms_norm(x1, self.norm_ffn, eps)
        hidden = silu(torch.matmul(u2, self.ffn.w1.t())) * torch.matmul(u2, self.ffn.w3.t())
        return x1 + torch.matmul(hidden, self.ffn.w2.t()), state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A whole sequence from a fresh state: x (B, T, D) → (B, T, D)."""
        return self.run(x)[0]


@dataclass
class BlockState:
    """Per-sequence state of a block, for a batch (C++ ``BlockState``): the memory layer's state,
    the attention's KV cache (MAC: the current segment's interleaved [h, u] keys, or its u keys
    with memory tokens), MAC's snapshot of the memory weights at the segment start, MAL's memory
    outputs at the persistent tokens (B, N_p, D), whether the memory has been primed, and the
    position."""

    memory: Optional[NeuralMemoryState]
    attention: Optional[AttentionState]
    snapshot: Optional[List[torch.Tensor]]
    persistent_y: Optional[torch.Tensor]
    primed: bool
    position: int

    def detach(self) -> "BlockState":
        return BlockState(None if self.memory is None else self.memory.detach(),
                          None if self.attention is None else self.attention.detach(),
                          None if self.snapshot is None else [w.detach() for w in self.snapshot],
                          None if self.persistent_y is None else self.persistent_y.detach(), self.primed,
                          self.position)
