# SPDX-License-Identifier: Apache-2.0
"""titans_torch: a pure-PyTorch twin of the titans C++ library (docs/MATH.md, docs/WEIGHTS.md).

The same math, the same parameter names and the same tensor layouts as the C++ code, and
safetensors files that either side reads:

    import titans_torch as tt
    loaded = tt.load_model("lm.safetensors")       # written by titans::save_model
    logits = loaded.model(tokens)                   # tokens (B, T) -> (B, T, V)
    loss = loaded.model.loss(tokens, targets)       # autograd goes through the test-time updates
    logits, state = loaded.model.run(tokens[:, :5])     # streaming: continue with run(more, state)
    tt.save_model("trained.safetensors", loaded.model)   # titans::load_model reads it
"""
from .memory import (ConfigError, MemoryConfig, MemoryState, chunk_coefficients, inner_loss, make_memory_state,
                     memory_apply, memory_forward)
from .layer import NeuralMemory, NeuralMemoryConfig, NeuralMemoryState
from .attention import Attention, AttentionConfig, AttentionState
from .blocks import BLOCK_KINDS, Block, BlockConfig, BlockState
from .model import ModelConfig, ModelState, TitansModel
from .io import (FormatError, LoadedModel, ShapeError, load_layer, load_model, load_tensors,
                 model_config_from_metadata, model_metadata, neural_memory_config_from_metadata,
                 neural_memory_metadata, read_safetensors, save_layer, save_model, write_safetensors)

__all__ = [
    "ConfigError", "MemoryConfig", "MemoryState", "chunk_coefficients", "inner_loss", "make_memory_state",
    "memory_apply", "memory_forward", "NeuralMemory", "NeuralMemoryConfig", "NeuralMemoryState", "Attention",
    "AttentionConfig", "AttentionState", "BLOCK_KINDS", "Block", "BlockConfig", "BlockState", "ModelConfig",
    "ModelState", "TitansModel", "FormatError",
    "LoadedModel", "ShapeError", "load_layer", "load_model", "load_tensors", "model_config_from_metadata",
    "model_metadata", "neural_memory_config_from_metadata", "neural_memory_metadata", "read_safetensors",
    "save_layer", "save_model", "write_safetensors",
]
