# SPDX-License-Identifier: Apache-2.0
"""safetensors files as the C++ library writes and reads them (include/titans/checkpoint.hpp),
with torch and numpy only, and the metadata that ``titans::load_model`` needs.

File: 8 bytes little-endian header length N, N bytes of JSON (``{name: {"dtype", "shape",
"data_offsets"}, "__metadata__": {str: str}}``), then the data, each tensor row-major
little-endian. A C++ matrix (rows, cols) is stored with shape [rows, cols], so the array seen
here has the C++ rows and columns (docs/WEIGHTS.md).
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
from typing import Dict, Mapping, NamedTuple, Optional, Tuple

import numpy as np
import torch

from .blocks import BLOCK_KINDS, BlockConfig
from .layer import NeuralMemory, NeuralMemoryConfig
from .memory import ACTIVATIONS, BIASES, ConfigError
from .model import ModelConfig, TitansModel

MAX_HEADER_BYTES = 100_000_000

# safetensors dtype -> (numpy dtype, bytes); F32, F64, F16 and BF16 load into a model (BF16, which
# numpy lacks, is widened to float32 exactly when read)
_DTYPES = {
    "BOOL": ("|b1", 1), "U8": ("|u1", 1), "I8": ("|i1", 1), "F8_E5M2": (None, 1), "F8_E4M3": (None, 1),
    "I16": ("<i2", 2), "U16": ("<u2", 2), "F16": ("<f2", 2), "BF16": (None, 2), "I32": ("<i4", 4),
    "U32": ("<u4", 4), "F32": ("<f4", 4), "F64": ("<f8", 8), "I64": ("<i8", 8), "U64": ("<u8", 8),
}


class FormatError(ValueError):
    """A file is not what it must be (C++ ``titans::FormatError``): the message says what."""


class ShapeError(ValueError):
    """A tensor's shape does not fit (C++ ``titans::ShapeError``): both shapes are named."""


# --- raw safetensors ---------------------------------------------------------------------------

def read_safetensors(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """All tensors of a file (numpy arrays in the file's dtype and shape) and its metadata.
    Throws FormatError naming what is malformed."""
    with open(path, "rb") as f:
        data = f.read()
    return parse_safetensors(data, where=f"titans_torch.read_safetensors({path!r})")


def parse_safetensors(data: bytes, where: str = "titans_torch.parse_safetensors"):
    if len(data) < 8:
        raise FormatError(f"{where}: input is {len(data)} bytes, shorter than the 8-byte header length field")
    n = struct.unpack("<Q", data[:8])[0]
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"{where}: header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if n > len(data) - 8:
        raise FormatError(f"{where}: header length {n} runs past the end of the input "
                          f"({len(data) - 8} bytes follow the length field)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{where}: header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise FormatError(f"{where}: header is a JSON {type(header).__name__}, expected an object")
    blob = memoryview(data)[8 + n:]
    metadata: Dict[str, str] = {}
    tensors: Dict[str, np.ndarray] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise FormatError(f"{where}: '__metadata__' must be an object of strings")
            metadata = dict(entry)
            continue
        if not isinstance(entry, dict):
            raise FormatError(f"{where}: tensor {name!r}: entry is not an object")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in entry:
                raise FormatError(f"{where}: tensor {name!r} has no '{key}'")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPES:
            raise FormatError(f"{where}: tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                  for s in shape):
            raise FormatError(f"{where}: tensor {name!r}: 'shape' must be an array of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
            raise FormatError(f"{where}: tensor {name!r}: 'data_offsets' must be an array [begin, end]")
        begin, end = offsets
        width = _DTYPES[dtype][1]
        count = math.prod(shape)
        if end < begin or end > len(blob):
            raise FormatError(f"{where}: tensor {name!r}: data_offsets [{begin}, {end}] lie outside the "
                              f"{len(blob)}-byte data buffer")
        if end - begin != count * width:
            raise FormatError(f"{where}: tensor {name!r}: {end - begin} bytes for shape {shape} of {dtype}, "
                              f"expected {count * width}")
        np_dtype = _DTYPES[dtype][0]
        if dtype == "BF16":  # the high half of a float32: widen exactly
            bits = np.frombuffer(blob[begin:end], dtype="<u2").astype(np.uint32) << 16
            tensors[name] = bits.view(np.float32).reshape(shape).copy()
            continue
        if np_dtype is None:
            raise FormatError(f"{where}: tensor {name!r} has dtype {dtype}, which this reader cannot decode")
        tensors[name] = np.frombuffer(blob[begin:end], dtype=np_dtype).reshape(shape).copy()
    return tensors, metadata


def write_safetensors(path: str, tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None,
                      dtype: Optional[torch.dtype] = None) -> None:
    """Writes tensors (any shape; torch tensors or numpy arrays) in name order, back to back,
    the header padded with spaces so that the data starts 8-byte aligned, atomically (a
    temporary file renamed over ``path``). ``dtype`` (torch.float32 / float64) converts floating
    tensors; None keeps each tensor's own."""
    where = f"titans_torch.write_safetensors({path!r})"
    header: Dict[str, object] = {}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        if name == "__metadata__":
            raise ValueError(f"{where}: a tensor is named '__metadata__', which the format reserves")
        t = tensors[name]
        a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        if dtype is not None and np.issubdtype(a.dtype, np.floating):
            a = a.astype(np.float32 if dtype == torch.float32 else np.float64)
        code = {np.dtype("float32"): "F32", np.dtype("float64"): "F64", np.dtype("int64"): "I64",
                np.dtype("int32"): "I32"}.get(a.dtype)
        if code is None:
            raise ValueError(f"{where}: tensor {name!r} has dtype {a.dtype}, expected float32, float64, int32 or int64")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise ValueError(f"{where}: tensor {name!r} holds a non-finite value")
        raw = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError(f"{where}: metadata must map strings to strings, got {k!r}: {v!r}")
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((-(8 + len(text))) % 8)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for c in chunks:
                f.write(c)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --- loading tensors into a module, by the C++ names and shape rule ---------------------------

def _fits(file_shape, shape) -> bool:
    """checkpoint.hpp's rule: [r, c]; [r] for (r, 1); [] for (1, 1)."""
    r, c = shape
    fs = list(file_shape)
    return fs == [r, c] or (fs == [r] and c == 1) or (fs == [] and r == 1 and c == 1)


def load_tensors(module: torch.nn.Module, tensors: Mapping[str, np.ndarray], where: str,
                 allow_extra: bool = False) -> None:
    """Copies every parameter of ``module`` from ``tensors`` (by state_dict name), checking
    everything before anything is changed: a missing tensor, one the module does not have
    (unless allow_extra), a wrong shape, a dtype other than F32/F64 or a non-finite value is an
    exception naming the tensor."""
    params = dict(module.named_parameters())
    staged = {}
    for name, p in params.items():
        if name not in tensors:
            raise FormatError(f"{where}: the file has no tensor {name!r} (the model needs it)")
        a = tensors[name]
        if a.dtype not in (np.float32, np.float64, np.float16):
            raise FormatError(f"{where}: tensor {name!r} has dtype {a.dtype}; only F32, F64, BF16 and F16 can be loaded")
        if not _fits(a.shape, tuple(p.shape)):
            raise ShapeError(f"{where}: tensor {name!r} has shape {list(a.shape)} in the file, but the "
                             f"parameter is {tuple(p.shape)}")
        if not np.isfinite(a).all():
            raise FormatError(f"{where}: tensor {name!r} holds a non-finite value")
        staged[name] = torch.from_numpy(np.ascontiguousarray(a).reshape(tuple(p.shape)))
    if not allow_extra:
        for name in sorted(tensors):
            if name not in params:
                raise FormatError(f"{where}: the file holds tensor {name!r}, which the model does not have")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(staged[name].to(dtype=p.dtype, device=p.device))


# --- metadata (the C++ to_metadata / *_config_from_metadata) --------------------------------

def format_real(v: float) -> str:
    """As C++ ``detail::format_real``: 17 significant digits (ostream precision 17)."""
    return format(float(v), ".17g")


def _b(v: bool) -> str:
    return "true" if v else "false"


def neural_memory_metadata(c: NeuralMemoryConfig) -> Dict[str, str]:
    p = "neural_memory."
    return {p + "dim": str(c.dim), p + "heads": str(c.heads), p + "depth": str(c.depth),
            p + "expansion": str(c.expansion), p + "activation": c.activation, p + "residual": _b(c.residual),
            p + "output_norm": _b(c.output_norm), p + "surprise_clamp": format_real(c.surprise_clamp),
            p + "eta_max": format_real(c.eta_max), p + "alpha_max": format_real(c.alpha_max),
            p + "chunk_size": str(c.chunk_size),
            p + "conv_kernel": str(c.conv_kernel), p + "theta_max": format_real(c.theta_max),
            p + "per_chunk_gates": _b(c.per_chunk_gates), p + "norm_eps": format_real(c.norm_eps),
            p + "bias": c.bias, p + "bias_p": format_real(c.bias_p), p + "bias_eps": format_real(c.bias_eps),
            p + "threshold_max": format_real(c.threshold_max)}


def model_metadata(c: ModelConfig) -> Dict[str, str]:
    b = c.block
    m = neural_memory_metadata(b.memory)
    m.update({"block.dim": str(b.dim), "block.attention_heads": str(b.attention_heads),
              "block.window": str(b.window), "block.segment": str(b.segment), "block.persistent": str(b.persistent),
              "block.ffn_hidden": str(b.ffn_hidden), "block.rope_base": format_real(b.rope_base),
              "block.attention_block": str(b.attention_block), "block.norm_eps": format_real(b.norm_eps),
              "block.checkpoint_every": str(b.checkpoint_every), "block.memory_tokens": str(b.memory_tokens),
              "model.vocab": str(c.vocab), "model.layers": ",".join(c.layers), "model.tied": _b(c.tied),
              "model.norm_eps": format_real(c.norm_eps)})
    return m


class _Reader:
    """Typed reads of metadata keys. A missing required key is recorded (the value read is None)
    and finish() names every one at once, as the C++ reader does; a key read with a default may
    be missing; a malformed value raises at once, naming the key."""

    def __init__(self, where: str, m: Mapping[str, str]):
        self.where, self.m, self.missing = where, m, []

    def _text(self, key: str, default):
        if key in self.m:
            return self.m[key]
        if default is _REQUIRED:
            self.missing.append(key)
        return None

    def integer(self, key: str, default=None):
        default = _REQUIRED if default is None else default
        s = self._text(key, default)
        if s is None:
            return None if default is _REQUIRED else default
        if not re.fullmatch(r"\s*[+-]?[0-9]+", s):
            raise FormatError(f"{self.where}: '{key}' is '{s}', not an integer")
        return int(s)

    def real(self, key: str, default=None):
        default = _REQUIRED if default is None else default
        s = self._text(key, default)
        if s is None:
            return None if default is _REQUIRED else default
        try:
            if "_" in s or s.rstrip() != s:
                raise ValueError
            return float(s)
        except ValueError:
            raise FormatError(f"{self.where}: '{key}' is '{s}', not a number") from None

    def boolean(self, key: str, default=None):
        default = _REQUIRED if default is None else default
        s = self._text(key, default)
        if s is None:
            return None if default is _REQUIRED else default
        if s not in ("true", "false"):
            raise FormatError(f"{self.where}: '{key}' is '{s}', not a bool (true or false)")
        return s == "true"

    def text(self, key: str, default=None):
        default = _REQUIRED if default is None else default
        s = self._text(key, default)
        return (None if default is _REQUIRED else default) if s is None else s

    def finish(self):
        if self.missing:
            keys = ", ".join(f"'{k}'" for k in self.missing)
            more = f" ({len(self.missing)} required keys missing)" if len(self.missing) > 1 else ""
            raise FormatError(f"{self.where}: metadata has no {keys}{more}")


_REQUIRED = object()


def _memory_fields(r: _Reader):
    """The neural_memory.* keys, with the C++ defaults (metadata_fields in neural_memory.hpp): the
    bounds added later (output_norm, surprise_clamp, eta_max, alpha_max) read as off when missing."""
    act = r.text("neural_memory.activation", "silu")
    if act not in ACTIVATIONS:
        raise FormatError(f"{r.where}: 'neural_memory.activation' is '{act}', not silu, gelu or identity")
    # The attentional bias (docs/MATH.md §11): absent in files from before it, which are l2.
    bias = r.text("neural_memory.bias", "l2")
    if bias not in BIASES:
        raise FormatError(f"{r.where}: 'neural_memory.bias' is '{bias}', not l2, huber, huber_radial or lp")
    return dict(
        dim=r.integer("neural_memory.dim"), heads=r.integer("neural_memory.heads"),
        depth=r.integer("neural_memory.depth"), expansion=r.integer("neural_memory.expansion"), activation=act,
        residual=r.boolean("neural_memory.residual"), output_norm=r.boolean("neural_memory.output_norm", False),
        surprise_clamp=r.real("neural_memory.surprise_clamp", 0.0), eta_max=r.real("neural_memory.eta_max", 1.0),
        alpha_max=r.real("neural_memory.alpha_max", 1.0),
        chunk_size=r.integer("neural_memory.chunk_size"), conv_kernel=r.integer("neural_memory.conv_kernel"),
        theta_max=r.real("neural_memory.theta_max"), per_chunk_gates=r.boolean("neural_memory.per_chunk_gates", False),
        norm_eps=r.real("neural_memory.norm_eps", 1e-6),
        bias=bias, bias_p=r.real("neural_memory.bias_p", 3.0), bias_eps=r.real("neural_memory.bias_eps", 1e-6),
        threshold_max=r.real("neural_memory.threshold_max", 4.0))


def neural_memory_config_from_metadata(m: Mapping[str, str],
                                       where: str = "titans_torch.neural_memory_config_from_metadata"
                                       ) -> NeuralMemoryConfig:
    """As the C++ function: every missing required key named at once; defaults for the others."""
    r = _Reader(where, m)
    fields = _memory_fields(r)
    r.finish()
    c = NeuralMemoryConfig(**fields)
    try:
        c.validate(where)
    except ConfigError as e:
        raise FormatError(f"{where}: metadata describes an invalid layer: {e}") from None
    return c


def model_config_from_metadata(m: Mapping[str, str], where: str = "titans_torch.model_config_from_metadata"
                               ) -> ModelConfig:
    r = _Reader(where, m)
    layers_s = r.text("model.layers")
    layers = layers_s.split(",") if layers_s else []
    for k in layers:
        if k not in BLOCK_KINDS:
            raise FormatError(f"{where}: 'model.layers' is '{layers_s}', not a comma-separated list of "
                              f"{', '.join(BLOCK_KINDS)}")
    if layers_s == "":
        raise FormatError(f"{where}: 'model.layers' is '', not a comma-separated list of {', '.join(BLOCK_KINDS)}")
    vocab, tied, norm_eps = r.integer("model.vocab"), r.boolean("model.tied"), r.real("model.norm_eps", 1e-6)
    block = dict(
        dim=r.integer("block.dim"), attention_heads=r.integer("block.attention_heads"),
        window=r.integer("block.window"), segment=r.integer("block.segment"),
        persistent=r.integer("block.persistent"), ffn_hidden=r.integer("block.ffn_hidden"),
        rope_base=r.real("block.rope_base", 10000.0), attention_block=r.integer("block.attention_block", 64),
        norm_eps=r.real("block.norm_eps", 1e-6), checkpoint_every=r.integer("block.checkpoint_every", 1),
        memory_tokens=r.integer("block.memory_tokens", 0))
    memory = _memory_fields(r)
    r.finish()
    c = ModelConfig(vocab=vocab, layers=layers, block=BlockConfig(memory=NeuralMemoryConfig(**memory), **block),
                    tied=tied, norm_eps=norm_eps)
    try:
        c.validate(where)
    except ConfigError as e:
        raise FormatError(f"{where}: metadata describes an invalid model: {e}") from None
    return c


# --- whole models and layers -------------------------------------------------------------------

class LoadedModel(NamedTuple):
    config: ModelConfig
    model: TitansModel
    metadata: Dict[str, str]


def _file_dtype(tensors: Mapping[str, np.ndarray]) -> torch.dtype:
    return torch.float64 if any(a.dtype == np.float64 for a in tensors.values()) else torch.float32


def _save_with_config(path: str, module: torch.nn.Module, meta: Dict[str, str], extra: Optional[Mapping[str, str]],
                      dtype: Optional[torch.dtype], function: str, what: str) -> None:
    """Every parameter of ``module`` with the config's metadata ``meta`` plus ``extra`` (which may
    not be config keys)."""
    for k, v in (extra or {}).items():
        if k in meta:
            raise ValueError(f"titans_torch.{function}: extra metadata key '{k}' is a key of the {what}'s config")
        meta[k] = v
    write_safetensors(path, dict(module.named_parameters()), meta, dtype)


def save_model(path: str, model: TitansModel, extra: Optional[Mapping[str, str]] = None,
               dtype: Optional[torch.dtype] = None) -> None:
    """The C++ ``save_model``: every parameter under its C++ name and shape, the config in the
    metadata, plus the caller's ``extra`` keys (which may not be config keys)."""
    _save_with_config(path, model, model_metadata(model.cfg), extra, dtype, "save_model", "model")


def load_model(path: str, dtype: Optional[torch.dtype] = None, device=None) -> LoadedModel:
    """Rebuilds a model saved by C++ ``save_model`` (or by save_model here) from the file alone.
    ``dtype`` None takes float64 for an F64 file, float32 otherwise."""
    where = f"titans_torch.load_model({path!r})"
    tensors, meta = read_safetensors(path)
    cfg = model_config_from_metadata(meta, where)
    model = TitansModel(cfg, dtype=dtype or _file_dtype(tensors), device=device)
    load_tensors(model, tensors, where)
    return LoadedModel(cfg, model, meta)


def save_layer(path: str, layer: NeuralMemory, extra: Optional[Mapping[str, str]] = None,
               dtype: Optional[torch.dtype] = None) -> None:
    """A layer as C++ ``save_checkpoint(path, params, to_metadata(cfg))`` writes it."""
    _save_with_config(path, layer, neural_memory_metadata(layer.cfg), extra, dtype, "save_layer", "layer")


def load_layer(path: str, dtype: Optional[torch.dtype] = None, device=None) -> Tuple[NeuralMemory, Dict[str, str]]:
    where = f"titans_torch.load_layer({path!r})"
    tensors, meta = read_safetensors(path)
    cfg = neural_memory_config_from_metadata(meta, where)
    layer = NeuralMemory(cfg, dtype=dtype or _file_dtype(tensors), device=device)
    load_tensors(layer, tensors, where)
    return layer, meta
