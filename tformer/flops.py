"""FLOP and byte arithmetic for MFU and decode rooflines (pure Python)."""

from __future__ import annotations

from tformer.config import ModelConfig


def param_count(cfg: ModelConfig, encoder_decoder: bool = False, include_positions: bool = False) -> int:
    """Parameters, counting the padded vocabulary as stored."""
    d, f, h, kh, hd = cfg.d_model, cfg.d_ff_, cfg.num_heads, cfg.kv_heads, cfg.head_dim_
    bias = cfg.use_bias
    attn = d * h * hd * 2 + d * kh * hd * 2 + (h * hd + 2 * kh * hd + d if bias else 0)
    mlp = d * f * (3 if cfg.gated else 2) + (f + d if bias else 0)
    norm = d * (2 if cfg.norm == "layernorm" else 1)
    dec_layer = attn + mlp + 2 * norm + ((attn + norm) if encoder_decoder else 0)
    total = cfg.num_layers * dec_layer + cfg.padded_vocab * d
    if not cfg.tie_embeddings:
        total += d * cfg.padded_vocab
    if cfg.norm_placement == "pre" and cfg.final_norm:
        total += norm * (2 if encoder_decoder else 1)
    if encoder_decoder:
        total += cfg.num_encoder_layers * (attn + mlp + 2 * norm)
    if include_positions and cfg.positions == "learned":
        total += cfg.max_len * d
    return total


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 N + 12 L d T (Kaplan et al. / PaLM appendix B), N without position table.

    The attention term uses d = num_heads * head_dim (the width of QK^T and AV).
    """
    n = param_count(cfg)
    return 6.0 * n + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim_ * seq_len
