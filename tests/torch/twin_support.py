# SPDX-License-Identifier: Apache-2.0
"""Shared helpers of the PyTorch-twin tests: the skip rule, small configs, the bridge runner."""
import os
import subprocess
import sys

SKIP = 77  # CTest SKIP_RETURN_CODE of these tests


def require_torch():
    """Exits with code 77 (ctest: skipped) and says why when torch or numpy cannot be imported."""
    try:
        import numpy  # noqa: F401
        import torch
    except ImportError as e:
        print(f"SKIPPED: the PyTorch-twin tests need python3 with torch and numpy ({e}); "
              "on Debian: apt-get install python3-torch", flush=True)
        sys.exit(SKIP)
    here = os.path.dirname(os.path.abspath(__file__))
    package_root = os.path.join(here, "..", "..", "python")
    if package_root not in sys.path:
        sys.path.insert(0, package_root)
    torch.set_num_threads(1)


def bridge(*args):
    """Runs tests/torch/torch_bridge (its path in TITANS_TORCH_BRIDGE); raises with its stderr."""
    exe = os.environ.get("TITANS_TORCH_BRIDGE")
    if not exe:
        raise RuntimeError("TITANS_TORCH_BRIDGE is not set (ctest sets it to the torch_bridge program)")
    r = subprocess.run([exe, *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"torch_bridge {' '.join(map(str, args))} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def write_sequences(path, seqs):
    with open(path, "w") as f:
        for s in seqs:
            f.write(" ".join(str(int(t)) for t in s) + "\n")


def read_sequences(path):
    with open(path) as f:
        return [[int(t) for t in line.split()] for line in f if line.strip()]


def model_config(layers, *, dim=8, vocab=13, heads=2, attention_heads=2, depth=2, window=4, segment=5,
                 persistent=2, chunk=3, conv=4, tied=True, attention_block=64, memory_tokens=0, **memory):
    import titans_torch as tt
    mem = tt.NeuralMemoryConfig(dim=dim, heads=heads, depth=depth, expansion=2, chunk_size=chunk,
                                conv_kernel=conv, **memory)
    block = tt.BlockConfig(dim=dim, attention_heads=attention_heads, window=window, segment=segment,
                           persistent=persistent, ffn_hidden=0, attention_block=attention_block,
                           memory_tokens=memory_tokens, memory=mem)
    return tt.ModelConfig(vocab=vocab, layers=list(layers), block=block, tied=tied)


# The configurations every comparison runs: all five block kinds, memory depth 1 and 2, the
# bounded read-out (residual, output_norm) on and off, the surprise clamp on (small enough to
# act on some tokens) and off, η_max < 1 and = 1, per-chunk gates, SiLU / GELU / identity, no
# convolution, tied and untied heads, with and without persistent tokens, MAC segments that are
# and are not multiples of the chunk size, windows shorter than the sequence, and sliding-window
# attention in query blocks (attention_block) smaller than the sequence and than the window, MAC's
# Figure 3a form (memory_tokens: fewer and more memory tokens than a segment holds), and the gate
# bounds α_max < 1 and the ablations α_max = η_max = 0.
CONFIGS = {
    "mac+swa_deep_bounded": dict(layers=["mac", "swa"], depth=2, surprise_clamp=2.0, eta_max=0.9, segment=5,
                                 chunk=3, tied=True, persistent=2, attention_block=4),
    "lmm+mag_linear_unbounded": dict(layers=["lmm", "mag"], depth=1, residual=False, output_norm=False,
                                     surprise_clamp=0.0, eta_max=1.0, chunk=4, conv=1, tied=False, persistent=0),
    "mal_gelu_per_chunk": dict(layers=["mal"], depth=2, activation="gelu", per_chunk_gates=True, residual=True,
                               output_norm=False, surprise_clamp=1.0, tied=False, persistent=3, window=4,
                               attention_block=3),
    "mac_identity_aligned": dict(layers=["mac"], depth=1, activation="identity", residual=False, output_norm=True,
                                 persistent=0, segment=4, chunk=4, tied=True, theta_max=0.5,
                                 surprise_clamp=1.0),
    "all_kinds_deep": dict(layers=["swa", "lmm", "mal", "mag", "mac"], depth=2, per_chunk_gates=True, chunk=2,
                           segment=3, window=3, tied=False, persistent=1, surprise_clamp=3.0, attention_block=5),
    "mac_tokens+mag_deep": dict(layers=["mac", "mag"], memory_tokens=3, depth=2, segment=5, chunk=3, persistent=2,
                                surprise_clamp=2.0, alpha_max=0.5, attention_block=4),
    "mac_tokens_linear_ablation": dict(layers=["mac"], memory_tokens=7, depth=1, segment=4, chunk=2, persistent=0,
                                       tied=False, alpha_max=0.0, eta_max=0.0, surprise_clamp=0.0),
    # The attentional biases (docs/MATH.md §11): the huber biases at the default δ_max = 4, which
    # puts residuals on both sides of δ (test_huber_branches_both_occur; at δ_max = 2 nearly all
    # are above, at 8 none), lp with the paper's p = 3 and with p < 2.
    "mac+lmm_huber_radial": dict(layers=["mac", "lmm"], depth=2, bias="huber_radial", threshold_max=4.0,
                                 surprise_clamp=2.0, segment=5, chunk=3, persistent=2),
    "mag_huber_linear": dict(layers=["mag"], depth=1, bias="huber", threshold_max=4.0, surprise_clamp=0.0,
                             chunk=4, tied=False, persistent=1),
    "mal_lp3_deep": dict(layers=["mal"], depth=2, bias="lp", bias_p=3.0, surprise_clamp=1.5, chunk=3, persistent=2),
    "lmm_lp1.5_linear": dict(layers=["lmm"], depth=1, bias="lp", bias_p=1.5, bias_eps=1e-3, chunk=2, tied=False,
                             surprise_clamp=0.0),
}
