# SPDX-License-Identifier: Apache-2.0
"""Pure-Python tests of titans_torch (no C++): the dual-form kernel against a literal
token-by-token loop, streaming splits of the layer, autograd against finite differences, and
the safetensors / metadata code, including the exceptions bad files raise."""
import json
import os
import struct
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import twin_support  # noqa: E402

twin_support.require_torch()

import numpy as np  # noqa: E402
import torch  # noqa: E402

import titans_torch as tt  # noqa: E402


def reference_memory(cfg, b, w_init, k, v, q, alpha, eta, theta, gain):
    """The update rule of docs/MATH.md §2 literally, one token at a time: the inner gradient by
    autograd at the chunk-start weights, the clamp, S and Θ, then the read after the write."""
    w = [x.clone() for x in w_init]
    s = [torch.zeros_like(x) for x in w_init]
    w0 = None
    ys = []
    for t in range(k.shape[0]):
        if t % b == 0:
            w0 = [x.detach().clone().requires_grad_(True) for x in w]
        loss = tt.inner_loss(cfg, w0, k[t:t + 1], v[t:t + 1], gain)
        u = torch.autograd.grad(loss, w0)
        th = theta[t]
        if cfg.surprise_clamp > 0:
            g = torch.sqrt(sum((x * x).sum() for x in u))
            if g > cfg.surprise_clamp:
                th = th * cfg.surprise_clamp / g
        s = [eta[t] * sl - th * ul for sl, ul in zip(s, u)]
        w = [(1 - alpha[t]) * wl + sl for wl, sl in zip(w, s)]
        ys.append(tt.memory_apply(cfg, w, q[t:t + 1], gain))
    return torch.cat(ys), w, s


class KernelTest(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(3)

    def inputs(self, cfg, T):
        d = cfg.dim
        k = torch.nn.functional.normalize(torch.randn(T, d, dtype=torch.float64), dim=-1)
        q = torch.nn.functional.normalize(torch.randn(T, d, dtype=torch.float64), dim=-1)
        v = torch.randn(T, d, dtype=torch.float64)
        alpha = torch.rand(T, dtype=torch.float64) * 0.1
        alpha[2] = 0.0
        alpha[5] = 1.0  # gates of exactly 0 and 1 are exact
        eta = torch.rand(T, dtype=torch.float64)
        eta[3] = 0.0
        eta[4] = 1.0
        theta = torch.rand(T, dtype=torch.float64) * 0.1
        gain = 1 + 0.1 * torch.randn(d, dtype=torch.float64) if cfg.output_norm else None
        w = [torch.randn(cfg.layer_out(l), cfg.layer_in(l), dtype=torch.float64) / cfg.layer_in(l) ** 0.5
             for l in range(cfg.depth)]
        return w, k, v, q, alpha, eta, theta, gain

    def test_dual_form_equals_token_loop(self):
        worst = 0.0
        for depth in (1, 2, 3):
            for act in ("silu", "gelu", "identity"):
                for residual, output_norm, clamp in ((False, False, 0.0), (True, True, 20.0), (True, False, 1.5)):
                    for b in (1, 4, 5):
                        cfg = tt.MemoryConfig(dim=6, depth=depth, expansion=2, activation=act, residual=residual,
                                              output_norm=output_norm, surprise_clamp=clamp, norm_eps=1e-3)
                        w, k, v, q, alpha, eta, theta, gain = self.inputs(cfg, 13)
                        y_ref, w_ref, s_ref = reference_memory(cfg, b, w, k, v, q, alpha, eta, theta, gain)
                        y, st = tt.memory_forward(cfg, b, k, v, q, alpha, eta, theta, tt.make_memory_state(w), gain)
                        worst = max(worst, float((y - y_ref).abs().max() / (1 + y_ref.abs().max())))
                        for a, r in zip(st.weights + st.momentum, w_ref + s_ref):
                            worst = max(worst, float((a - r).abs().max() / (1 + r.abs().max())))
        print(f"dual form vs token loop: max difference {worst:.3e}")
        self.assertLess(worst, 1e-10)

    def test_clamp_acts(self):
        # the clamp configuration above must actually clamp some tokens and not others
        cfg = tt.MemoryConfig(dim=6, depth=2, expansion=2, residual=True, output_norm=True, surprise_clamp=20.0,
                              norm_eps=1e-3)
        w, k, v, q, alpha, eta, theta, gain = self.inputs(cfg, 13)
        a, delta = tt.memory.key_path(cfg, w, k, v, gain)
        clamped = tt.memory.clamp_steps(cfg, a, delta, theta)
        n = int((clamped < theta).sum())
        self.assertGreater(n, 0)
        self.assertLess(n, 13)

    def test_any_split_equals_one_call(self):
        cfg = tt.MemoryConfig(dim=5, depth=2, expansion=2, residual=True, output_norm=True, surprise_clamp=0.5)
        w, k, v, q, alpha, eta, theta, gain = self.inputs(cfg, 13)
        y1, s1 = tt.memory_forward(cfg, 4, k, v, q, alpha, eta, theta, tt.make_memory_state(w), gain)
        for cuts in ([1, 2, 3], [5, 6], [7]):
            st = tt.make_memory_state(w)
            parts = []
            edges = [0] + cuts + [13]
            for a0, a1 in zip(edges[:-1], edges[1:]):
                y, st = tt.memory_forward(cfg, 4, k[a0:a1], v[a0:a1], q[a0:a1], alpha[a0:a1], eta[a0:a1],
                                          theta[a0:a1], st, gain)
                parts.append(y)
            self.assertLess(float((torch.cat(parts) - y1).abs().max()), 1e-12)
            self.assertEqual(st.position, 13)
            for a, r in zip(st.weights, s1.weights):
                self.assertLess(float((a - r).abs().max()), 1e-12)

    def test_state_from_another_chunk_size_is_refused(self):
        cfg = tt.MemoryConfig(dim=4, depth=1)
        w, k, v, q, alpha, eta, theta, _ = self.inputs(cfg, 6)
        _, st = tt.memory_forward(cfg, 4, k[:3], v[:3], q[:3], alpha[:3], eta[:3], theta[:3], tt.make_memory_state(w))
        with self.assertRaisesRegex(ValueError, "chunk_start"):
            tt.memory_forward(cfg, 3, k[3:], v[3:], q[3:], alpha[3:], eta[3:], theta[3:], st)


class LayerTest(unittest.TestCase):
    def test_split_calls_equal_one_call(self):
        torch.manual_seed(5)
        for per_chunk in (False, True):
            cfg = tt.NeuralMemoryConfig(dim=8, heads=2, depth=2, expansion=2, chunk_size=3, conv_kernel=3,
                                        per_chunk_gates=per_chunk, surprise_clamp=2.0)
            layer = tt.NeuralMemory(cfg, dtype=torch.float64, seed=2)
            with torch.no_grad():  # gates that differ per token, so per-chunk routing matters
                layer.w_alpha.normal_(0, 1)
                layer.w_eta.normal_(0, 1)
                layer.w_theta.normal_(0, 1)
            x = torch.randn(2, 11, 8, dtype=torch.float64)
            o1, s1 = layer(x)
            st = None
            parts = []
            for a0, a1 in ((0, 1), (1, 5), (5, 7), (7, 11)):
                o, st = layer(x[:, a0:a1], st)
                parts.append(o)
            self.assertLess(float((torch.cat(parts, dim=1) - o1).abs().max()), 1e-12)
            self.assertLess(float((st.chunk_gates - s1.chunk_gates).abs().max()), 1e-15)
            # each sequence of the batch has its own memory
            o_single, _ = layer(x[1:2])
            self.assertLess(float((o_single - o1[1:2]).abs().max()), 1e-12)

    def test_model_streams_exactly(self):
        # any split of a sequence into calls, down to one token per call, gives the logits of
        # one call, for every configuration of the C++ comparisons (MAC segments, windows,
        # chunks and convolution windows split anywhere); a batch keeps its sequences apart
        torch.manual_seed(4)
        tokens = torch.randint(0, 13, (2, 17))
        for name, kw in twin_support.CONFIGS.items():
            with self.subTest(config=name):
                model = tt.TitansModel(twin_support.model_config(**kw), dtype=torch.float64, seed=6)
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.1 * torch.randn_like(p))
                    whole = model(tokens)
                    for cuts in ([1, 2, 3, 7, 11, 16], list(range(1, 17))):
                        state, parts = None, []
                        for a0, a1 in zip([0] + cuts, cuts + [17]):
                            out, state = model.run(tokens[:, a0:a1], state)
                            parts.append(out)
                        self.assertEqual(state.position, 17)
                        self.assertLess(float((torch.cat(parts, dim=1) - whole).abs().max()), 1e-12)
                    self.assertLess(float((model(tokens[1:]) - whole[1:]).abs().max()), 1e-12)

    def test_blocked_sliding_window_equals_full_mask(self):
        torch.manual_seed(2)
        for window in (1, 3, 8):
            attn = tt.Attention(tt.AttentionConfig(dim=8, heads=2, window=window), dtype=torch.float64, seed=1)
            x = torch.randn(2, 13, 8, dtype=torch.float64)
            p = torch.randn(2, 2, 8, dtype=torch.float64)
            full = attn(x, p)
            for block in (1, 4, 5):
                self.assertLess(float((attn(x, p, block) - full).abs().max()), 1e-14)
                self.assertLess(float((attn(x, None, block) - attn(x, None)).abs().max()), 1e-14)

    def test_autograd_matches_finite_differences(self):
        # Second order: the inner gradient depends on W_K (through k), on Θ_init and on γ;
        # gradcheck compares autograd with central differences of the whole forward.
        from torch.nn.utils.stateless import functional_call
        torch.manual_seed(7)
        cfg = tt.NeuralMemoryConfig(dim=4, heads=2, depth=2, expansion=2, chunk_size=2, conv_kernel=2,
                                    surprise_clamp=0.5, norm_eps=1e-3)
        layer = tt.NeuralMemory(cfg, dtype=torch.float64, seed=1)
        names = ["w_k", "memory_init.w1", "memory_init.w2", "b_theta", "w_eta", "memory_gain"]
        x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
        w = torch.randn(1, 5, 4, dtype=torch.float64)
        values = [dict(layer.named_parameters())[n].detach().clone().requires_grad_(True) for n in names]

        def f(x, *vals):
            return (functional_call(layer, dict(zip(names, vals)), (x,))[0] * w).sum()

        self.assertTrue(torch.autograd.gradcheck(f, [x] + values, eps=1e-6, atol=1e-7, rtol=1e-5))


class ConversionTest(unittest.TestCase):
    """docs/WEIGHTS.md's recipe for PyTorch's own module layouts gives the layer's numbers."""

    def test_linear_conv1d_embedding_recipe(self):
        torch.manual_seed(11)
        D, H, K, T, V = 8, 2, 3, 7, 5
        cfg = tt.NeuralMemoryConfig(dim=D, heads=H, depth=1, expansion=1, chunk_size=2, conv_kernel=K)
        layer = tt.NeuralMemory(cfg, dtype=torch.float64)
        lin = torch.nn.Linear(D, D, bias=False).double()
        conv = torch.nn.Conv1d(D, D, K, groups=D, bias=False, padding=K - 1).double()
        gate = torch.nn.Linear(D, H).double()
        emb = torch.nn.Embedding(V, D).double()
        with torch.no_grad():
            layer.w_v.copy_(lin.weight)                  # (out, in) as is
            layer.conv_v.copy_(conv.weight[:, 0, :])     # (D, 1, K) -> (D, K), no flip
            layer.w_eta.copy_(gate.weight)
            layer.b_eta.copy_(gate.bias.reshape(H, 1))
        tokens = torch.randint(0, V, (1, T))
        embedding = emb.weight.t()                        # titans (D, V) = weight.T, column v = token v
        model = tt.TitansModel(twin_support.model_config(["lmm"], dim=D, vocab=V), dtype=torch.float64)
        with torch.no_grad():
            model.embedding.copy_(embedding)
        x = model.embedding.t()[tokens]                   # what TitansModel.hidden feeds the blocks
        self.assertTrue(torch.equal(x, emb(tokens)))
        _, v, _, _, eta, _, _, _ = layer._inputs(x, layer.initial_state(1))
        want_v = torch.nn.functional.silu(conv(lin(x).transpose(1, 2))[..., :T]).transpose(1, 2)
        self.assertLess(float((v - want_v).abs().max()), 1e-14)
        want_eta = cfg.eta_max * torch.sigmoid(gate(x))
        self.assertLess(float((eta - want_eta).abs().max()), 1e-15)


class IoTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.path = lambda name: os.path.join(self.dir.name, name)

    def tearDown(self):
        self.dir.cleanup()

    def small_model(self, dtype=torch.float64, **kw):
        return tt.TitansModel(twin_support.model_config(**{"layers": ["mac", "mal"], **kw}), dtype=dtype, seed=4)

    def test_file_layout(self):
        a = torch.arange(6, dtype=torch.float64).reshape(2, 3)
        b = torch.ones(3, 1, dtype=torch.float32)
        tt.write_safetensors(self.path("t.safetensors"), {"b": b, "a": a}, {"k": "v"})
        with open(self.path("t.safetensors"), "rb") as f:
            data = f.read()
        n = struct.unpack("<Q", data[:8])[0]
        self.assertEqual((8 + n) % 8, 0)
        header = json.loads(data[8:8 + n])
        self.assertEqual(header["a"], {"dtype": "F64", "shape": [2, 3], "data_offsets": [0, 48]})
        self.assertEqual(header["b"], {"dtype": "F32", "shape": [3, 1], "data_offsets": [48, 60]})
        self.assertEqual(header["__metadata__"], {"k": "v"})
        # row-major: element (0, 1) is the second value
        self.assertEqual(struct.unpack("<d", data[8 + n + 8:8 + n + 16])[0], 1.0)
        tensors, meta = tt.read_safetensors(self.path("t.safetensors"))
        self.assertTrue(np.array_equal(tensors["a"], a.numpy()))
        self.assertEqual(meta, {"k": "v"})

    def test_model_round_trip_and_metadata(self):
        m = self.small_model(tied=False, per_chunk_gates=True, surprise_clamp=1.5)
        tt.save_model(self.path("m.safetensors"), m, {"run.steps": "3"})
        loaded = tt.load_model(self.path("m.safetensors"))
        self.assertEqual(loaded.config, m.cfg)
        self.assertEqual(loaded.metadata["run.steps"], "3")
        self.assertEqual(loaded.metadata["neural_memory.norm_eps"], "9.9999999999999995e-07")
        tokens = torch.randint(0, 13, (2, 9))
        self.assertTrue(torch.equal(loaded.model(tokens), m(tokens)))
        with self.assertRaisesRegex(ValueError, "'model.vocab' is a key of the model's config"):
            tt.save_model(self.path("x.safetensors"), m, {"model.vocab": "3"})

    def test_old_files_read_bounds_as_off(self):
        meta = tt.model_metadata(self.small_model().cfg)
        for key in ("neural_memory.output_norm", "neural_memory.surprise_clamp", "neural_memory.eta_max",
                    "neural_memory.alpha_max", "block.checkpoint_every"):
            del meta[key]
        c = tt.model_config_from_metadata(meta)
        self.assertEqual((c.block.memory.output_norm, c.block.memory.surprise_clamp, c.block.memory.eta_max,
                          c.block.memory.alpha_max, c.block.checkpoint_every), (False, 0.0, 1.0, 1.0, 1))

    def test_attentional_bias_metadata(self):
        # Every bias of docs/MATH.md §11 and its constants round-trip through the metadata; an
        # unknown bias or a bad constant is refused by name; a file without the keys (from before
        # the biases) is l2 with the C++ defaults.
        meta = tt.model_metadata(self.small_model().cfg)
        self.assertEqual(meta["neural_memory.bias"], "l2")
        for bias in ("huber", "huber_radial", "lp"):
            meta.update({"neural_memory.bias": bias, "neural_memory.bias_p": "2.5",
                         "neural_memory.bias_eps": "0.001", "neural_memory.threshold_max": "3"})
            m = tt.model_config_from_metadata(meta).block.memory
            self.assertEqual((m.bias, m.bias_p, m.bias_eps, m.threshold_max), (bias, 2.5, 0.001, 3.0))
            self.assertEqual(tt.model_metadata(tt.model_config_from_metadata(meta)), meta)
        meta["neural_memory.bias"] = "l1"
        with self.assertRaisesRegex(tt.FormatError, "'neural_memory.bias' is 'l1', not l2, huber, huber_radial or lp"):
            tt.model_config_from_metadata(meta)
        meta["neural_memory.bias"] = "lp"
        meta["neural_memory.bias_p"] = "0.5"
        with self.assertRaisesRegex(tt.FormatError, "bias_p is 0.5, expected a finite value >= 1"):
            tt.model_config_from_metadata(meta)
        meta["neural_memory.bias_p"] = "3"
        meta["neural_memory.threshold_max"] = "0"
        with self.assertRaisesRegex(tt.FormatError, "threshold_max is 0"):
            tt.model_config_from_metadata(meta)
        for key in ("neural_memory.bias", "neural_memory.bias_p", "neural_memory.bias_eps",
                    "neural_memory.threshold_max"):
            del meta[key]
        m = tt.model_config_from_metadata(meta).block.memory
        self.assertEqual((m.bias, m.bias_p, m.bias_eps, m.threshold_max), ("l2", 3.0, 1e-6, 4.0))

    def test_huber_layer_has_the_threshold_projection(self):
        # w_delta (H, D) and b_delta (H, 1) exist with the huber biases only, as in C++
        for bias, present in (("l2", False), ("lp", False), ("huber", True), ("huber_radial", True)):
            layer = tt.NeuralMemory(tt.NeuralMemoryConfig(dim=8, heads=2, depth=1, expansion=2, bias=bias),
                                    dtype=torch.float64)
            names = dict(layer.named_parameters())
            self.assertEqual("w_delta" in names and "b_delta" in names, present, bias)
            if present:
                self.assertEqual((tuple(names["w_delta"].shape), tuple(names["b_delta"].shape)), ((2, 8), (2, 1)))

    def test_bias_gradient_is_the_gradient_of_the_bias(self):
        # bias_gradient (what the memory descends) against autograd of bias_loss, token by token,
        # on residuals on both sides of the huber threshold
        gen = torch.Generator().manual_seed(4)
        r = torch.randn(7, 5, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 3.0, 7, dtype=torch.float64)[:, None]
        thr = torch.full((7,), 2.0, dtype=torch.float64)
        norms = r.norm(dim=-1)
        self.assertTrue(bool((norms < 2.0).any()) and bool((norms > 2.0).any()))
        for bias in ("l2", "huber", "huber_radial", "lp"):
            cfg = tt.MemoryConfig(dim=5, depth=1, bias=bias, bias_p=3.0)
            x = r.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(tt.memory.bias_loss(cfg, x, thr), x)
            self.assertTrue(torch.allclose(tt.memory.bias_gradient(cfg, r, thr), g, rtol=1e-12, atol=1e-12), bias)

    def test_huber_without_a_threshold_is_refused(self):
        cfg = tt.MemoryConfig(dim=4, depth=1, bias="huber")
        w = [torch.zeros(4, 4, dtype=torch.float64)]
        k = torch.zeros(3, 4, dtype=torch.float64)
        g = torch.full((3,), 0.5, dtype=torch.float64)
        with self.assertRaisesRegex(ValueError, "the huber bias needs threshold"):
            tt.memory_forward(cfg, 2, k, k, k, g, g, g, tt.make_memory_state(w))
        with self.assertRaisesRegex(ValueError, "threshold has a value <= 0"):
            tt.memory_forward(cfg, 2, k, k, k, g, g, g, tt.make_memory_state(w), None, torch.zeros(3, dtype=torch.float64))

    def rewrite(self, edit_tensors=None, edit_meta=None):
        m = self.small_model()
        tensors = {n: p.detach() for n, p in m.named_parameters()}
        meta = tt.model_metadata(m.cfg)
        if edit_tensors:
            edit_tensors(tensors)
        if edit_meta:
            edit_meta(meta)
        tt.write_safetensors(self.path("bad.safetensors"), tensors, meta)
        return self.path("bad.safetensors")

    def test_bad_files_name_the_problem(self):
        def extra(t):
            t["block0.memory.w_extra"] = torch.zeros(2, 2)

        def missing(t):
            del t["block1.ffn.w2"]

        def shape(t):
            t["block0.retrieve.w"] = torch.zeros(8, 7)

        def dtype(t):
            t["norm_final"] = torch.zeros(8, 1, dtype=torch.int64)

        def no_key(m):
            del m["block.segment"]

        def no_keys(m):  # every missing required key is named at once; keys with a default may go
            for k in ("model.vocab", "neural_memory.depth", "block.rope_base", "neural_memory.norm_eps"):
                del m[k]

        def bad_int(m):
            m["model.vocab"] = "13x"

        def bad_kind(m):
            m["model.layers"] = "mac,xyz"

        def bad_bool(m):
            m["model.tied"] = "yes"

        def invalid(m):
            m["neural_memory.heads"] = "3"

        cases = [
            (dict(edit_tensors=extra), tt.FormatError, "'block0.memory.w_extra', which the model does not have"),
            (dict(edit_tensors=missing), tt.FormatError, "no tensor 'block1.ffn.w2'"),
            (dict(edit_tensors=shape), tt.ShapeError, r"'block0.retrieve.w' has shape \[8, 7\].*\(8, 8\)"),
            (dict(edit_tensors=dtype), tt.FormatError, "'norm_final' has dtype int64"),
            (dict(edit_meta=no_key), tt.FormatError, "metadata has no 'block.segment'"),
            (dict(edit_meta=bad_int), tt.FormatError, "'model.vocab' is '13x', not an integer"),
            (dict(edit_meta=no_keys), tt.FormatError,
             "metadata has no 'model.vocab', 'neural_memory.depth' \\(2 required keys missing\\)"),
            (dict(edit_meta=bad_kind), tt.FormatError, "'model.layers' is 'mac,xyz', not a comma-separated list"),
            (dict(edit_meta=bad_bool), tt.FormatError, "'model.tied' is 'yes', not a bool"),
            (dict(edit_meta=invalid), tt.FormatError, r"heads \(3\) does not divide dim \(8\)"),
        ]
        for kwargs, exc, pattern in cases:
            with self.subTest(pattern=pattern):
                path = self.rewrite(**kwargs)
                with self.assertRaisesRegex(exc, pattern):
                    tt.load_model(path)

    def test_half_precision_files_load(self):
        # A model's file rewritten by hand in F16 and in BF16 (as the C++ save_model(..., Dtype::f16
        # / bf16) writes them): every value loads as exactly the 16-bit value the file holds.
        m = self.small_model()
        tensors = {n: p.detach().to(torch.float32).numpy() for n, p in m.named_parameters()}
        meta = tt.model_metadata(m.cfg)
        for code in ("F16", "BF16"):
            header, blobs, offset = {}, [], 0
            for name in sorted(tensors):
                a = np.ascontiguousarray(tensors[name])
                if code == "F16":
                    raw = a.astype("<f2").tobytes()
                    want = a.astype(np.float16).astype(np.float32)
                else:  # BF16 by truncation: a valid BF16 value, whichever rounding made it
                    raw = (a.view(np.uint32) >> 16).astype("<u2").tobytes()
                    want = ((a.view(np.uint32) >> 16) << 16).astype(np.uint32).view(np.float32)
                header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
                blobs.append((name, raw, want))
                offset += len(raw)
            header["__metadata__"] = meta
            text = json.dumps(header).encode()
            text += b" " * ((8 - (8 + len(text)) % 8) % 8)
            path = self.path(f"half_{code}.safetensors")
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(text)) + text + b"".join(raw for _, raw, _ in blobs))
            loaded = tt.load_model(path).model
            got = dict(loaded.named_parameters())
            for name, _, want in blobs:
                self.assertTrue(np.array_equal(got[name].detach().numpy().reshape(want.shape), want), f"{code} {name}")

    def test_vector_as_1d_tensor_loads(self):
        path = self.rewrite(edit_tensors=lambda t: t.__setitem__("norm_final", torch.full((8,), 2.0)))
        self.assertTrue(torch.all(tt.load_model(path).model.norm_final == 2.0))

    def test_malformed_bytes(self):
        with open(self.rewrite(), "rb") as f:
            good = f.read()
        n = struct.unpack("<Q", good[:8])[0]
        cases = [
            (good[:5], "shorter than the 8-byte header length field"),
            (struct.pack("<Q", 10 ** 12) + good[8:], "exceeds the limit"),
            (struct.pack("<Q", len(good)) + good[8:], "runs past the end"),
            (good[:8] + b"\xff" + good[9:], "not valid JSON"),
            (good[:8 + n + 8], "outside the"),
        ]
        for data, pattern in cases:
            with self.subTest(pattern=pattern):
                with open(self.path("m.safetensors"), "wb") as f:
                    f.write(data)
                with self.assertRaisesRegex(tt.FormatError, pattern):
                    tt.load_model(self.path("m.safetensors"))

    def test_layer_round_trip(self):
        cfg = tt.NeuralMemoryConfig(dim=8, heads=2, depth=2, expansion=2, chunk_size=3, alpha_max=0.25)
        layer = tt.NeuralMemory(cfg, dtype=torch.float64, seed=3)
        tt.save_layer(self.path("l.safetensors"), layer)
        back, meta = tt.load_layer(self.path("l.safetensors"))
        self.assertEqual(back.cfg, cfg)
        self.assertEqual(meta["neural_memory.alpha_max"], "0.25")
        x = torch.randn(1, 7, 8, dtype=torch.float64)
        self.assertTrue(torch.equal(back(x)[0], layer(x)[0]))
        del meta["neural_memory.alpha_max"]  # a file from before the bound: α_max = 1
        self.assertEqual(tt.neural_memory_config_from_metadata(meta).alpha_max, 1.0)

    def test_gate_bounds(self):
        # α = α_max σ(·), η = η_max σ(·); a bound of 0 gives exactly 0 (the no-forgetting and
        # no-momentum ablations); values outside [0, 1] are refused naming the field
        x = torch.randn(1, 5, 8, dtype=torch.float64)
        for alpha_max, eta_max in ((0.5, 0.95), (0.0, 0.0)):
            cfg = tt.NeuralMemoryConfig(dim=8, heads=2, depth=1, chunk_size=2, alpha_max=alpha_max, eta_max=eta_max)
            layer = tt.NeuralMemory(cfg, dtype=torch.float64, seed=4)
            with torch.no_grad():
                layer.b_alpha.fill_(3.0)
            _, _, _, alpha, eta, _, _, _ = layer._inputs(x, layer.initial_state(1))
            want = alpha_max * torch.sigmoid(torch.matmul(x, layer.w_alpha.t()) + 3.0)
            self.assertTrue(torch.equal(alpha, want))
            if eta_max == 0:
                self.assertTrue(bool((alpha == 0).all()) and bool((eta == 0).all()))
        for name in ("alpha_max", "eta_max"):
            for bad in (-0.1, 1.5, float("nan")):
                with self.assertRaisesRegex(tt.ConfigError, f"{name} is"):
                    tt.NeuralMemoryConfig(dim=8, heads=2, **{name: bad}).validate()

    def test_bad_tokens(self):
        m = self.small_model()
        with self.assertRaisesRegex(ValueError, r"token 13 is outside \[0, 13\)"):
            m([[1, 13]])


if __name__ == "__main__":
    unittest.main(verbosity=2)
