"""tformer: a JAX/Flax NNX Transformer research codebase.

    import jax, tformer
    from flax import nnx
    cfg = tformer.ModelConfig(vocab_size=256, d_model=128, num_heads=4, num_layers=2)
    model = tformer.DecoderLM(cfg, rngs=nnx.Rngs(0))
    logits = model(tokens)                                  # parallel, teacher-forced
    out = tformer.generate(model, prompts, tformer.Decode(max_new_tokens=32))  # prefill + decode loop
"""

from tformer import host  # tformer.host.tune_allocator(), first thing in a CPU training script
from tformer.compress import compress_mlp, quantize_weights
from tformer.config import ModelConfig, gpt2_small, transformer_base
from tformer.families import model_class
from tformer.generate import (
    Decode,
    Generated,
    Sampling,
    beam_search,
    decode_phases,  # exported here: `tformer.generate` is the function, so `tformer.generate.<name>` fails
    generate,
    sample_logits,
    sequence_logprob,
)
from tformer.hf import config_from_hf, load_hf_checkpoint, save_hf_checkpoint  # safetensors imported lazily
from tformer.kvcache import KVCache
from tformer.lora import LoraConfig
from tformer.models import DecoderLM, EncoderDecoder
from tformer.sharding import PRESETS, make_mesh, rules_for
from tformer.training import OptimizerConfig, TrainState, create_train_state, make_eval_step, make_train_step

__all__ = [
    "ModelConfig", "gpt2_small", "transformer_base",
    "DecoderLM", "EncoderDecoder", "model_class", "KVCache",
    "generate", "beam_search", "sequence_logprob", "sample_logits", "decode_phases", "Decode", "Sampling",
    "Generated",
    "OptimizerConfig", "TrainState", "LoraConfig", "create_train_state", "make_train_step", "make_eval_step",
    "make_mesh", "rules_for", "PRESETS",
    "config_from_hf", "load_hf_checkpoint", "save_hf_checkpoint",
    "quantize_weights", "compress_mlp",
    "host",
]
