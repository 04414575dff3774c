"""ModelConfig rejects every bad field with a message naming it (and the fix)."""

import jax.numpy as jnp
import pytest
from flax import nnx

from tformer import DecoderLM, EncoderDecoder, ModelConfig, OptimizerConfig, gpt2_small, transformer_base

OK = dict(vocab_size=100, d_model=32, num_heads=4, num_layers=1, max_len=16)

BAD = [
    (dict(d_model=30, num_heads=4), r"ModelConfig.d_model: d_model=30 is not divisible by num_heads=4; "
                                    r"choose num_heads dividing d_model or set head_dim explicitly"),
    (dict(num_kv_heads=3), r"ModelConfig.num_kv_heads: num_kv_heads=3 must divide num_heads=4"),
    (dict(num_kv_heads=0), r"ModelConfig.num_kv_heads: must be >= 1, got 0"),
    (dict(num_heads=0), r"ModelConfig.num_heads: must be >= 1, got 0"),
    (dict(head_dim=0), r"ModelConfig.head_dim: must be >= 1, got 0"),
    (dict(max_len=0), r"ModelConfig.max_len: must be >= 1, got 0"),
    (dict(num_layers=0), r"ModelConfig.num_layers: must be >= 1, got 0"),
    (dict(vocab_size=1), r"ModelConfig.vocab_size: must be >= 2, got 1"),
    (dict(d_ff=0), r"ModelConfig.d_ff: must be >= 1, got 0"),
    (dict(positions="alibi"), r"ModelConfig.positions: unknown kind 'alibi'; choose one of \('learned', "),
    (dict(attention="splash"), r"ModelConfig.attention: unknown kind 'splash'; choose one of \('auto', "),
    (dict(norm="batchnorm"), r"ModelConfig.norm: unknown kind 'batchnorm'; choose one of \('layernorm', 'rmsnorm'\)"),
    (dict(norm_placement="sandwich"), r"ModelConfig.norm_placement: unknown kind 'sandwich'"),
    (dict(activation="tanh"), r"ModelConfig.activation: unknown kind 'tanh'; choose one of \('gelu', "),
    (dict(remat="some"), r"ModelConfig.remat: unknown policy 'some'; choose one of \('none', "),
    (dict(dtype="float64"), r"ModelConfig.dtype: unknown dtype 'float64'; choose one of \('float32', "),
    (dict(param_dtype="int8"), r"ModelConfig.param_dtype: unknown dtype 'int8'"),
    (dict(logits_dtype="fp32"), r"ModelConfig.logits_dtype: unknown dtype 'fp32'"),
    (dict(positions="rope", num_heads=1, head_dim=7), r"ModelConfig.head_dim: RoPE needs an even head_dim, got 7"),
    (dict(positions="rope", d_model=36, num_heads=4), r"ModelConfig.head_dim: RoPE needs an even head_dim, got 9"),
    (dict(pad_id=100), r"ModelConfig.pad_id: pad_id=100 is outside the vocabulary \[0, 100\)"),
    (dict(bos_id=-1), r"ModelConfig.bos_id: bos_id=-1 is outside the vocabulary \[0, 100\)"),
    (dict(eos_id=250), r"ModelConfig.eos_id: eos_id=250 is outside the vocabulary \[0, 100\)"),
    (dict(dropout=1.0), r"ModelConfig.dropout: must be in \[0, 1\), got 1.0"),
    (dict(attention_dropout=-0.1), r"ModelConfig.attention_dropout: must be in \[0, 1\), got -0.1"),
    (dict(local_window=0), r"ModelConfig.local_window: must be >= 1 or None, got 0"),
    (dict(vocab_multiple=0), r"ModelConfig.vocab_multiple: must be >= 1"),
    (dict(rope_theta=0.0), r"ModelConfig.rope_theta: must be > 0, got 0.0"),
    (dict(norm_eps=0.0), r"ModelConfig.norm_eps: must be > 0, got 0.0"),
    (dict(init_std=-1.0), r"ModelConfig.init_std: must be >= 0, got -1.0"),
]


@pytest.mark.parametrize("bad,message", BAD, ids=[next(iter(b)) + "=" + str(next(iter(b.values()))) for b, _ in BAD])
def test_bad_field_is_named(bad, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**OK, **bad})


def test_replace_validates_too():
    cfg = ModelConfig(**OK)
    with pytest.raises(ValueError, match=r"ModelConfig.num_kv_heads: num_kv_heads=3 must divide num_heads=4"):
        cfg.replace(num_kv_heads=3)


def test_derived_sizes():
    cfg = ModelConfig(**OK, num_kv_heads=2, vocab_multiple=64)
    assert (cfg.kv_heads, cfg.resolved_head_dim, cfg.resolved_d_ff, cfg.padded_vocab) == (2, 8, 128, 128)
    assert ModelConfig(**{**OK, "vocab_size": 128}, vocab_multiple=64).padded_vocab == 128
    assert ModelConfig(**OK, head_dim=16).resolved_head_dim == 16  # explicit head_dim: no divisibility needed
    assert ModelConfig(**{**OK, "d_model": 30}, head_dim=8).resolved_head_dim == 8
    assert ModelConfig(**OK, activation="swiglu").gated and not ModelConfig(**OK).gated
    assert hash(ModelConfig(**OK)) == hash(ModelConfig(**OK))  # a static jit argument
    assert gpt2_small().padded_vocab == 50304
    base = transformer_base()
    assert (base.norm_placement, base.positions, base.num_encoder_layers) == ("post", "sinusoidal", 6)


def test_model_level_errors():
    with pytest.raises(ValueError, match=r"ModelConfig.num_encoder_layers: EncoderDecoder needs >= 1 encoder layer"):
        EncoderDecoder(ModelConfig(**OK), rngs=nnx.Rngs(0))
    model = DecoderLM(ModelConfig(**{**OK, "d_model": 8, "num_heads": 2, "max_len": 4}), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"sequence length 5 exceeds ModelConfig.max_len=4; shorten the input"):
        model(jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(ValueError, match=r"tokens must be \[batch, length\], got shape \(5,\)"):
        model(jnp.zeros((5,), jnp.int32))


OPT_BAD = [
    (dict(learning_rate=0.0), r"OptimizerConfig.learning_rate: must be > 0, got 0.0"),
    (dict(learning_rate=float("nan")), r"OptimizerConfig.learning_rate: must be > 0, got nan"),
    (dict(warmup_steps=-1), r"OptimizerConfig.warmup_steps: must be >= 0, got -1"),
    (dict(total_steps=0), r"OptimizerConfig.total_steps: must be >= 1, got 0"),
    (dict(schedule="cubic"), r"OptimizerConfig.schedule: unknown 'cubic'; choose one of \('cosine', "),
    (dict(min_lr_ratio=1.5), r"OptimizerConfig.min_lr_ratio: must be in \[0, 1\], got 1.5"),
    (dict(b1=1.0), r"OptimizerConfig.b1: must be in \[0, 1\), got 1.0"),
    (dict(b2=1.5), r"OptimizerConfig.b2: must be in \[0, 1\), got 1.5"),
    (dict(eps=0.0), r"OptimizerConfig.eps: must be > 0, got 0.0"),
    (dict(weight_decay=-5.0), r"OptimizerConfig.weight_decay: must be >= 0, got -5.0"),
    (dict(clip_norm=0.0), r"OptimizerConfig.clip_norm: must be > 0 or None \(no clipping\), got 0.0"),
    (dict(clip_norm=-1.0), r"OptimizerConfig.clip_norm: must be > 0 or None \(no clipping\), got -1.0"),
    (dict(grad_accum_steps=0), r"OptimizerConfig.grad_accum_steps: must be >= 1, got 0"),
    (dict(z_loss=-1e-4), r"OptimizerConfig.z_loss: must be >= 0 \(0 = off\), got -0.0001"),
    (dict(label_smoothing=1.0), r"OptimizerConfig.label_smoothing: must be in \[0, 1\), got 1.0"),
    (dict(name="sgd"), r"OptimizerConfig.name: unknown optimizer 'sgd'; choose one of \('adamw', 'muon'\)"),
    (dict(decay_fraction=0.0), r"OptimizerConfig.decay_fraction: must be in \(0, 1\], got 0.0"),
    (dict(muon_learning_rate=-1.0), r"OptimizerConfig.muon_learning_rate: must be > 0, got -1.0"),
    (dict(muon_beta=1.0), r"OptimizerConfig.muon_beta: must be in \[0, 1\), got 1.0"),
]


@pytest.mark.parametrize("bad,message", OPT_BAD, ids=[f"{k}={v}" for b, _ in OPT_BAD for k, v in b.items()])
def test_bad_optimizer_field_is_named(bad, message):
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(**bad)
    OptimizerConfig(clip_norm=None, weight_decay=0.0, b1=0.0, warmup_steps=0)  # the edges that are allowed
