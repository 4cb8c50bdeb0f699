# SPDX-License-Identifier: Apache-2.0
"""The language model (docs/MATH.md §10): embedding (D, V), blocks, final RMSNorm, tied or untied
head (V, D), cross-entropy. Tensor names are those of C++ ``ModelParams``: ``embedding``,
``block{i}.…``, ``norm_final`` and, untied, ``head``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import nn

from .blocks import Block, BlockConfig, rms_norm
from .layer import _normal
from .memory import ConfigError, _check_int, _check_real


@dataclass
class ModelConfig:
    """C++ ``titans::ModelConfig``: the blocks share ``block`` (its kind comes from ``layers``)."""

    vocab: int = 256
    layers: List[str] = field(default_factory=lambda: ["mac", "mac"])
    block: BlockConfig = field(default_factory=BlockConfig)
    tied: bool = True
    norm_eps: float = 1e-6

    def dim(self) -> int:
        return self.block.dim

    def block_config(self, i: int) -> BlockConfig:
        c = copy.deepcopy(self.block)
        c.kind = self.layers[i]
        return c

    def validate(self, where: str = "titans_torch.ModelConfig") -> None:
        _check_int(where, "vocab", self.vocab, 1, 1 << 24)
        if not self.layers:
            raise ConfigError(f"{where}: layers is empty, expected at least one block")
        if len(self.layers) > 1024:
            raise ConfigError(f"{where}: layers has {len(self.layers)} blocks, expected at most 1024")
        _check_real(where, "norm_eps", self.norm_eps, positive=True)
        for i in range(len(self.layers)):
            self.block_config(i).validate(where)


class TitansModel(nn.Module):
    """``forward(tokens)``: tokens (B, T) int64 → logits (B, T, V); each sequence from its own
    fresh state (its own memory)."""

    def __init__(self, cfg: ModelConfig, dtype=torch.float32, device=None, seed: int = 0):
        super().__init__()
        cfg.validate("titans_torch.TitansModel")
        self.cfg = cfg
        D, V = cfg.dim(), cfg.vocab
        self.embedding = nn.Parameter(torch.zeros(D, V, dtype=dtype, device=device))
        self.n_blocks = len(cfg.layers)
        for i in range(self.n_blocks):
            self.add_module(f"block{i}", Block(cfg.block_config(i), dtype, device))
        self.norm_final = nn.Parameter(torch.zeros(D, 1, dtype=dtype, device=device))
        self.head = nn.Parameter(torch.zeros(V, D, dtype=dtype, device=device)) if not cfg.tied else None
        self.reset_parameters(seed)

    def blocks(self) -> List[Block]:
        return [getattr(self, f"block{i}") for i in range(self.n_blocks)]

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """The C++ init's distributions (TitansModel<S>::init), from torch's generator."""
        gen = torch.Generator().manual_seed(int(seed))
        D, V = self.cfg.dim(), self.cfg.vocab
        dt = self.embedding.dtype
        self.embedding.copy_(_normal(gen, (D, V), 1 / math.sqrt(D), dt))
        for i, b in enumerate(self.blocks()):
            b.reset_parameters(seed * 31 + 17 + 1000003 * (i + 1))
        self.norm_final.fill_(1.0)
        if self.head is not None:
            self.head.copy_(_normal(gen, (V, D), 1 / math.sqrt(D), dt))

    def _tokens(self, tokens) -> torch.Tensor:
        t = torch.as_tensor(tokens, dtype=torch.long, device=self.embedding.device)
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2:
            raise ValueError(f"titans_torch.TitansModel: tokens have shape {tuple(t.shape)}, expected (B, T)")
        if t.numel() > 0 and (int(t.min()) < 0 or int(t.max()) >= self.cfg.vocab):
            bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
            raise ValueError(f"titans_torch.TitansModel: token {bad} is outside [0, {self.cfg.vocab})")
        return t

    def initial_state(self, batch: int = 1) -> "ModelState":
        return ModelState([b.initial_state(batch) for b in self.blocks()], 0)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        u = rms_norm(h, self.norm_final, self.cfg.norm_eps)
        if self.head is None:
            return torch.matmul(u, self.embedding)  # logits = Eᵀ u
        return torch.matmul(u, self.head.t())

    def run(self, tokens, state: Optional["ModelState"] = None):
        """Logits (B, T, V) for the tokens continuing `state` (None: fresh), and the state after."""
        t = self._tokens(tokens)
        if state is None:
            state = self.initial_state(t.shape[0])
        if len(state.blocks) != self.n_blocks:
            raise ValueError(f"titans_torch.TitansModel.run: the state holds {len(state.blocks)} blocks, "
                             f"the model has {self.n_blocks}")
        x = self.embedding.t()[t]
        new = []
        for b, s in zip(self.blocks(), state.blocks):
            x, s = b.run(x, s)
            new.append(s)
        return self._head(x), ModelState(new, state.position + t.shape[1])

    def forward(self, tokens) -> torch.Tensor:
        """Logits (B, T, V); each sequence from its own fresh state."""
        return self.run(tokens)[0]

    def loss(self, tokens, targets) -> torch.Tensor:
        """Mean next-token cross-entropy over every counted target of the batch (−1 = ignore),
        as TitansModel<S>::loss_and_gradient computes it."""
        logits = self.forward(tokens)
        y = torch.as_tensor(targets, dtype=torch.long, device=logits.device)
        if y.dim() == 1:
            y = y.unsqueeze(0)
        if y.shape != logits.shape[:2]:
            raise ValueError(f"titans_torch.TitansModel.loss: targets have shape {tuple(y.shape)}, "
                             f"expected {tuple(logits.shape[:2])}")
        if y.numel() > 0 and (int(y.min()) < -1 or int(y.max()) >= self.cfg.vocab):
            raise ValueError(f"titans_torch.TitansModel.loss: a target is outside [0, {self.cfg.vocab}) (or -1)")
        if int((y >= 0).sum()) == 0:
            return logits.sum() * 0
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                 ignore_index=-1, reduction="mean")

    @torch.no_grad()
    def generate(self, prompt: Sequence[int], count: int) -> List[int]:
        """Greedy continuation of one prompt (the argmax, lowest index on ties, as
        titans::sample_token at temperature 0): one prefill call, then one token at a time
        through every block's state, as titans::generate does."""
        if len(prompt) == 0:
            raise ValueError("titans_torch.TitansModel.generate: prompt is empty")
        out = []
        if int(count) <= 0:
            return out
        logits, state = self.run([list(int(t) for t in prompt)])
        for _ in range(int(count)):
            tok = int(torch.argmax(logits[0, -1]))
            out.append(tok)
            logits, state = self.run([[tok]], state)
        return out


@dataclass
class ModelState:
    """Every block's state (a batch) and the position."""

    blocks: List[object]
    position: int = 0

    def detach(self) -> "ModelState":
        return ModelState([b.detach() for b in self.blocks], self.position)
