"""Model configuration: one frozen dataclass, validated when it is built.

Every architectural choice is a field, so an experiment is a config and a
config is hashable (it is a static argument of jitted functions).
"""

from __future__ import annotations

import dataclasses
from typing import Any

POSITIONS = ("learned", "sinusoidal", "rope", "none")
NORMS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post")
ACTIVATIONS = ("gelu", "gelu_exact", "relu", "relu2", "silu", "swiglu", "geglu")  # relu2: relu(x)^2
ATTENTION_IMPLS = ("auto", "flash", "einsum", "xla", "cudnn", "blocked")
SEQUENCE_LAYOUTS = ("consecutive", "zigzag")
LOWRANK_KINDS = ("linformer", "nystrom")
KV_CACHE_DTYPES = ("int8",)
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"ModelConfig.{field}: {msg}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DecoderLM or EncoderDecoder.

    Defaults give a small GPT-2-like decoder. `num_encoder_layers > 0` is only
    used by `EncoderDecoder`.
    """

    vocab_size: int = 256
    d_model: int = 256
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: = num_heads (MHA); 1: MQA; else GQA.
    head_dim: int | None = None  # None: d_model // num_heads.
    d_ff: int | None = None  # None: 4 * d_model.
    num_layers: int = 4  # decoder layers
    num_encoder_layers: int = 0  # EncoderDecoder only
    max_len: int = 1024  # longest sequence (positions table, cache bound)
    positions: str = "learned"
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    norm_placement: str = "pre"  # pre-LN (GPT-2) or post-LN (Vaswani et al.)
    norm_eps: float = 1e-5
    activation: str = "gelu"
    # RMSNorm (no learned scale) over each query and key head before RoPE: attention logits stay bounded
    # by sqrt(head_dim) whatever the weights grow to, which tolerates higher learning rates.
    qk_norm: bool = False
    use_bias: bool = True
    norm_bias: bool = True  # LayerNorm's learned bias (nanoGPT's bias=False drops it too; RMSNorm has none)
    tie_embeddings: bool = True
    # Padding the vocabulary to a multiple of this makes the logits matmul
    # tile cleanly; the padded ids are masked out of every softmax.
    vocab_multiple: int = 128
    dropout: float = 0.0
    attention_dropout: float = 0.0
    attention: str = "auto"
    # Sequence parallelism's token layout (`tformer.ring_attention`): "consecutive" (device d holds the d-th
    # run of T / N positions) or "zigzag" (blocks d and 2N - 1 - d of 2N: equal causal work per device).
    sequence_layout: str = "consecutive"
    # Sparse attention. `local_window`: a token sees at most this many previous
    # positions, computed banded (O(T x window) time and memory, not O(T^2)).
    local_window: int | None = None
    # Keep only the k largest scores per query among the keys the mask allows.
    attention_topk: int | None = None
    # Drop post-softmax weights below this and renormalise (the largest always stays).
    attention_threshold: float | None = None
    # Low-rank encoder self-attention (bidirectional only): "linformer" projects
    # keys/values along the length to `lowrank_dim` rows; "nystrom" uses
    # `lowrank_dim` landmarks (segment means of queries and keys).
    attention_lowrank: str | None = None
    lowrank_dim: int | None = None
    # "int8": the KV cache holds int8 keys/values with one scale per token and
    # head (symmetric); None keeps the compute dtype.
    kv_cache_dtype: str | None = None
    # Factored MLP matrices W = U V with inner size `mlp_rank` (None: full matrices).
    mlp_rank: int | None = None
    scan_layers: bool = False  # lax.scan over layers (fast compile) vs unrolled
    remat: str = "none"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # master weights
    logits_dtype: str = "float32"
    # Scale embeddings by sqrt(d_model) (Vaswani et al. with sinusoids).
    scale_embeddings: bool = False
    final_norm: bool = True
    init_std: float = 0.02
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        _check(self.vocab_size >= 2, "vocab_size", f"must be >= 2, got {self.vocab_size}")
        _check(self.d_model >= 1, "d_model", f"must be >= 1, got {self.d_model}")
        _check(self.num_heads >= 1, "num_heads", f"must be >= 1, got {self.num_heads}")
        if self.head_dim is None:
            _check(
                self.d_model % self.num_heads == 0,
                "d_model",
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                "choose num_heads dividing d_model or set head_dim explicitly",
            )
        else:
            _check(self.head_dim >= 1, "head_dim", f"must be >= 1, got {self.head_dim}")
        kv = self.kv_heads
        _check(kv >= 1, "num_kv_heads", f"must be >= 1, got {kv}")
        _check(
            self.num_heads % kv == 0,
            "num_kv_heads",
            f"num_kv_heads={kv} must divide num_heads={self.num_heads}",
        )
        _check(self.num_layers >= 1, "num_layers", f"must be >= 1, got {self.num_layers}")
        _check(self.num_encoder_layers >= 0, "num_encoder_layers", "must be >= 0")
        _check(self.max_len >= 1, "max_len", f"must be >= 1, got {self.max_len}")
        _check(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        _check(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
        _check(self.init_std >= 0, "init_std", f"must be >= 0, got {self.init_std}")
        _check(self.positions in POSITIONS, "positions", f"unknown kind {self.positions!r}; choose one of {POSITIONS}")
        _check(self.norm in NORMS, "norm", f"unknown kind {self.norm!r}; choose one of {NORMS}")
        _check(
            self.norm_placement in NORM_PLACEMENTS,
            "norm_placement",
            f"unknown kind {self.norm_placement!r}; choose one of {NORM_PLACEMENTS}",
        )
        _check(self.activation in ACTIVATIONS, "activation",
               f"unknown kind {self.activation!r}; choose one of {ACTIVATIONS}")
        _check(self.attention in ATTENTION_IMPLS, "attention",
               f"unknown kind {self.attention!r}; choose one of {ATTENTION_IMPLS}")
        _check(self.sequence_layout in SEQUENCE_LAYOUTS, "sequence_layout",
               f"unknown layout {self.sequence_layout!r}; choose one of {SEQUENCE_LAYOUTS}")
        _check(self.remat in REMAT_POLICIES, "remat", f"unknown policy {self.remat!r}; choose one of {REMAT_POLICIES}")
        for f in ("dtype", "param_dtype", "logits_dtype"):
            _check(getattr(self, f) in DTYPES, f, f"unknown dtype {getattr(self, f)!r}; choose one of {DTYPES}")
        _check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        _check(0.0 <= self.attention_dropout < 1.0, "attention_dropout",
               f"must be in [0, 1), got {self.attention_dropout}")
        _check(self.vocab_multiple >= 1, "vocab_multiple", "must be >= 1")
        _check(self.resolved_d_ff >= 1, "d_ff", f"must be >= 1, got {self.d_ff}")
        if self.positions == "rope":
            _check(self.resolved_head_dim % 2 == 0, "head_dim",
                   f"RoPE needs an even head_dim, got {self.resolved_head_dim}")
        if self.local_window is not None:
            _check(self.local_window >= 1, "local_window", f"must be >= 1 or None, got {self.local_window}")
        self._check_cheaper_variants()
        for f in ("pad_id", "bos_id", "eos_id"):
            v = getattr(self, f)
            _check(0 <= v < self.vocab_size, f, f"{f}={v} is outside the vocabulary [0, {self.vocab_size})")

    def _check_cheaper_variants(self):
        """Sparse, low-rank and int8 fields: ranges and the combinations that have no meaning."""
        if self.attention_topk is not None:
            _check(self.attention_topk >= 1, "attention_topk", f"must be >= 1 or None, got {self.attention_topk}")
        if self.attention_threshold is not None:
            _check(0.0 <= self.attention_threshold < 1.0, "attention_threshold",
                   f"must be in [0, 1) or None, got {self.attention_threshold}")
        if self.attention_lowrank is not None:
            _check(self.attention_lowrank in LOWRANK_KINDS, "attention_lowrank",
                   f"unknown kind {self.attention_lowrank!r}; choose one of {LOWRANK_KINDS} or None")
            _check(self.num_encoder_layers >= 1, "attention_lowrank",
                   "low-rank attention is for bidirectional (encoder) self-attention and cannot be causal; "
                   "use an EncoderDecoder (num_encoder_layers >= 1) or set attention_lowrank=None")
            _check(self.lowrank_dim is not None and self.lowrank_dim >= 1, "lowrank_dim",
                   f"attention_lowrank={self.attention_lowrank!r} needs lowrank_dim >= 1, got {self.lowrank_dim}")
            _check(self.attention_topk is None and self.attention_threshold is None, "attention_lowrank",
                   "cannot be combined with attention_topk or attention_threshold; choose one")
            _check(self.attention_dropout == 0.0, "attention_lowrank", "has no attention dropout; set it to 0")
        else:
            _check(self.lowrank_dim is None, "lowrank_dim", "is only read with attention_lowrank; set one or neither")
        if self.kv_cache_dtype is not None:
            _check(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype",
                   f"unknown cache dtype {self.kv_cache_dtype!r}; choose one of {KV_CACHE_DTYPES} "
                   "or None (the compute dtype)")
        if self.mlp_rank is not None:
            top = min(self.d_model, self.resolved_d_ff)
            _check(1 <= self.mlp_rank <= top, "mlp_rank",
                   f"must be in [1, min(d_model, d_ff) = {top}] or None, got {self.mlp_rank}")

    # Derived sizes (trailing underscore: never None).
    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def resolved_head_dim(self) -> int:
        """`head_dim`, or its default d_model // num_heads."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    @property
    def resolved_d_ff(self) -> int:
        """`d_ff`, or its default 4 * d_model."""
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def padded_vocab(self) -> int:
        m = self.vocab_multiple
        return -(-self.vocab_size // m) * m

    @property
    def task(self) -> str:
        """"seq2seq" (an EncoderDecoder) when there are encoder layers, else "lm" (a DecoderLM)."""
        return "seq2seq" if self.num_encoder_layers > 0 else "lm"

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def gpt2_small(**kw: Any) -> ModelConfig:
    """GPT-2 124M shape (vocab padded to 50304 by vocab_multiple=128)."""
    base = dict(vocab_size=50257, d_model=768, num_heads=12, num_layers=12, max_len=1024,
                positions="learned", norm="layernorm", activation="gelu", use_bias=True,
                tie_embeddings=True, bos_id=50256, eos_id=50256, pad_id=50256)
    base.update(kw)
    return ModelConfig(**base)


def transformer_base(vocab_size: int = 32000, **kw: Any) -> ModelConfig:
    """The original Transformer base (Vaswani et al. 2017): 6+6 layers, d 512, 8 heads, post-LN."""
    base = dict(vocab_size=vocab_size, d_model=512, num_heads=8, d_ff=2048, num_layers=6,
                num_encoder_layers=6, max_len=512, positions="sinusoidal", norm="layernorm",
                norm_placement="post", activation="relu", use_bias=True, tie_embeddings=True,
                scale_embeddings=True, dropout=0.1)
    base.update(kw)
    return ModelConfig(**base)
