"""The models: `DecoderLM` (GPT-style) and `EncoderDecoder` (Vaswani et al.).

Each model has two ways to run the same function:
  * `__call__`: every position at once (teacher forcing + causal mask), for
    training and scoring;
  * `init_cache` + `extend`: a few new tokens against a KV cache, for
    generation (prefill = extend by the prompt, decode = extend by one).

Layers are stored stacked (a leading `layers` axis on every block weight), so
one checkpoint serves both the `lax.scan` and the unrolled forward.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from tformer import kvcache
from tformer.attention import Attention, Masking, attend, self_masking
from tformer.config import ModelConfig
from tformer.kvcache import KVCache
from tformer.layers import MLP, Embedder, Norm, dropout, fold
from tformer.sharding import constrain

_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nnx.Module):
    """One layer: self-attention, optional cross-attention, MLP; pre- or post-LN."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, cross: bool = False, encoder: bool = False):
        self.cfg = cfg
        self.has_cross = cross
        self.attn_norm = Norm(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs, lowrank=encoder)  # encoder: cfg.attention_lowrank applies
        if cross:
            self.cross_norm = Norm(cfg, rngs=rngs)
            self.cross_attn = Attention(cfg, rngs=rngs, cross=True)
        self.mlp_norm = Norm(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def _residual(self, x, norm, fn, rng):
        if self.cfg.norm_placement == "pre":
            return x + dropout(fn(norm(x)), self.cfg.dropout, rng)
        return norm(x + dropout(fn(x), self.cfg.dropout, rng))

    def __call__(self, x_btd, masking: Masking, *, enc_bsd=None, cross_masking=None, rng=None):
        x = self._residual(x_btd, self.attn_norm, lambda h: self.attn(h, masking, rng=fold(rng, 0)), fold(rng, 1))
        if self.has_cross:
            cross = lambda h: self.cross_attn(h, cross_masking, kv_src=enc_bsd, rng=fold(rng, 2))  # noqa: E731
            x = self._residual(x, self.cross_norm, cross, fold(rng, 3))
        x = self._residual(x, self.mlp_norm, self.mlp, fold(rng, 4))
        return constrain(x, ("batch", "length", "embed"))

    def extend(self, x_btd, masking: Masking, k_bskd, v_bskd, index, cross=None, visible: int | None = None):
        """Like __call__ for new tokens; writes their K/V at slot `index` first.

        `visible` (static): attend over cache slots [0, visible) only; the
        caller guarantees every slot the new tokens may see lies below it.
        """
        written = {}

        def self_attn(h):
            q = self.attn.query(h, masking.q_pos)
            k, v = self.attn.key_value(h, masking.q_pos)
            written["k"], written["v"] = kvcache.write(k_bskd, k, index), kvcache.write(v_bskd, v, index)
            k_att, v_att, m = written["k"], written["v"], masking
            if visible is not None and visible < k_att.shape[1]:
                k_att, v_att, m = k_att[:, :visible], v_att[:, :visible], masking.first_keys(visible)
            return self.attn.output(attend(q, k_att, v_att, m, self.cfg))

        x = self._residual(x_btd, self.attn_norm, self_attn, None)
        if self.has_cross:
            ck, cv, cmask = cross
            cross_fn = lambda h: self.cross_attn.output(  # noqa: E731
                attend(self.cross_attn.query(h, masking.q_pos), ck, cv, cmask, self.cfg)
            )
            x = self._residual(x, self.cross_norm, cross_fn, None)
        x = self._residual(x, self.mlp_norm, self.mlp, None)
        return x, written["k"], written["v"]


class Stack(nnx.Module):
    """`n` blocks whose weights are stacked on a leading `layers` axis."""

    def __init__(self, cfg: ModelConfig, n: int, *, rngs: nnx.Rngs, cross: bool = False, encoder: bool = False):
        self.cfg, self.n = cfg, n
        make = lambda key: Block(cfg, rngs=nnx.Rngs(key), cross=cross, encoder=encoder)  # noqa: E731
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(jax.random.key(0))))
        keys = jax.random.split(rngs.params(), n)
        self.layers = nnx.merge(graphdef, jax.vmap(lambda k: nnx.state(make(k)))(keys))

    def __call__(self, x, fn, rng=None):
        """x <- fn(block_i, x, rng_i) for each layer, scanned or unrolled."""
        graphdef, state = nnx.split(self.layers)

        def body(x, inp):
            layer_state, i = inp
            return fn(nnx.merge(graphdef, layer_state), x, fold(rng, i)), None

        if self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT[self.cfg.remat], prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers:
            x, _ = jax.lax.scan(body, x, (state, jnp.arange(self.n)))
            return x
        for i in range(self.n):
            x, _ = body(x, (jax.tree.map(lambda a: a[i], state), i))
        return x

    def unstacked(self) -> list[Block]:
        """Per-layer blocks (sliced once, e.g. before a decode loop)."""
        graphdef, state = nnx.split(self.layers)
        return [nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)) for i in range(self.n)]


def _default_positions(tokens_bt, positions_bt):
    if positions_bt is not None:
        return positions_bt
    b, t = tokens_bt.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def _check_tokens(tokens, cfg: ModelConfig):
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    if tokens.shape[1] > cfg.max_len:
        raise ValueError(
            f"sequence length {tokens.shape[1]} exceeds ModelConfig.max_len={cfg.max_len}; "
            "shorten the input or build the model with a larger max_len"
        )


class DecoderLM(nnx.Module):
    """Decoder-only language model (GPT-2 / Llama family, by config)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.attention_lowrank is not None:
            raise ValueError("ModelConfig.attention_lowrank: a DecoderLM is causal; low-rank attention is for the "
                             "bidirectional encoder of an EncoderDecoder. Set attention_lowrank=None")
        self.cfg = cfg
        self.embed = Embedder(cfg, rngs=rngs)
        self.blocks = Stack(cfg, cfg.num_layers, rngs=rngs)
        if cfg.norm_placement == "pre" and cfg.final_norm:
            self.final_norm = Norm(cfg, rngs=rngs)

    def _head(self, x_btd):
        if hasattr(self, "final_norm"):
            x_btd = self.final_norm(x_btd)
        return self.embed.decode(x_btd)

    def __call__(self, tokens_bt, *, positions=None, segment_ids=None, dropout_rng=None):
        """Logits [B, T, padded_vocab] for every position at once (causal).

        `segment_ids` ([B, T], 0 = padding) keep packed documents apart and
        `positions` restart per document; both default to one plain sequence.
        """
        cfg = self.cfg
        _check_tokens(tokens_bt, cfg)
        pos = _default_positions(tokens_bt, positions)
        masking = self_masking(pos, segment_ids, cfg, causal=True)
        if positions is not None:
            masking = dataclasses.replace(masking, dense_free=False)
        x = dropout(self.embed.encode(tokens_bt, pos), cfg.dropout, fold(dropout_rng, 0))
        x = self.blocks(x, lambda blk, x, r: blk(x, masking, rng=r), fold(dropout_rng, 1))
        return self._head(x)

    def init_cache(self, batch: int, length: int, dtype=None) -> KVCache:
        cfg = self.cfg
        return kvcache.for_config(cfg, batch, length, dtype)

    def extend(self, tokens_bt, cache: KVCache, valid_bt=None, layers: list[Block] | None = None,
               visible: int | None = None):
        """Run T new tokens against the cache: (logits [B, T, V], new cache).

        `valid_bt` marks real tokens (False = left padding of a short prompt).
        `layers` lets a decode loop pass blocks unstacked once, outside the loop.
        `visible` (static): self-attention reads cache slots [0, visible) only,
        so a decode loop need not read the slots it has not filled yet.
        """
        cfg = self.cfg
        if valid_bt is None:
            valid_bt = jnp.ones(tokens_bt.shape, bool)
        cache, pos_bt, masking = kvcache.advance(cache, valid_bt, cfg.local_window)
        x = self.embed.encode(tokens_bt, pos_bt)
        index = cache.index - tokens_bt.shape[1]
        ks, vs = [], []
        for i, blk in enumerate(layers or self.blocks.unstacked()):
            x, k, v = blk.extend(x, masking, cache.k[i], cache.v[i], index, visible=visible)
            ks.append(k)
            vs.append(v)
        return self._head(x), dataclasses.replace(cache, k=tuple(ks), v=tuple(vs))

    def decode_layers(self) -> list[Block]:
        return self.blocks.unstacked()


class EncoderDecoder(nnx.Module):
    """The original Transformer: bidirectional encoder, causal decoder with cross-attention.

    Source and target share one vocabulary and one embedding table.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.num_encoder_layers < 1:
            raise ValueError("ModelConfig.num_encoder_layers: EncoderDecoder needs >= 1 encoder layer")
        self.cfg = cfg
        self.embed = Embedder(cfg, rngs=rngs)
        self.encoder = Stack(cfg, cfg.num_encoder_layers, rngs=rngs, encoder=True)
        self.decoder = Stack(cfg, cfg.num_layers, rngs=rngs, cross=True)
        if cfg.norm_placement == "pre" and cfg.final_norm:
            self.encoder_norm = Norm(cfg, rngs=rngs)
            self.final_norm = Norm(cfg, rngs=rngs)

    def _src_segments(self, src_bs, src_segment_ids):
        if src_segment_ids is not None:
            return src_segment_ids
        return (src_bs != self.cfg.pad_id).astype(jnp.int32)

    def encode(self, src_bs, *, src_segment_ids=None, src_positions=None, dropout_rng=None):
        """Encoder output [B, S, D]; every source position in one pass.

        Source padding is `pad_id` unless `src_segment_ids` says otherwise.
        """
        cfg = self.cfg
        _check_tokens(src_bs, cfg)
        seg = self._src_segments(src_bs, src_segment_ids)
        pos = _default_positions(src_bs, src_positions)
        masking = self_masking(pos, seg, cfg, causal=False)
        x = dropout(self.embed.encode(src_bs, pos), cfg.dropout, fold(dropout_rng, 0))
        x = self.encoder(x, lambda blk, x, r: blk(x, masking, rng=r), fold(dropout_rng, 1))
        if hasattr(self, "encoder_norm"):
            x = self.encoder_norm(x)
        return x

    def _head(self, x_btd):
        if hasattr(self, "final_norm"):
            x_btd = self.final_norm(x_btd)
        return self.embed.decode(x_btd)

    def __call__(self, src_bs, tgt_inputs_bt, *, src_segment_ids=None, tgt_segment_ids=None,
                 tgt_positions=None, src_positions=None, dropout_rng=None):
        """Teacher-forced logits [B, T, V]: `tgt_inputs` is the target shifted right after BOS.

        Packed pairs: target segment i attends to source segment i (equal ids);
        pass `src_positions` / `tgt_positions` restarting at each segment.
        """
        cfg = self.cfg
        _check_tokens(tgt_inputs_bt, cfg)
        enc = self.encode(src_bs, src_segment_ids=src_segment_ids, src_positions=src_positions,
                          dropout_rng=fold(dropout_rng, 0))
        src_seg = self._src_segments(src_bs, src_segment_ids)
        pos = _default_positions(tgt_inputs_bt, tgt_positions)
        masking = self_masking(pos, tgt_segment_ids, cfg, causal=True)
        if tgt_positions is not None:
            masking = dataclasses.replace(masking, dense_free=False)
        cross = Masking(q_pos=pos, k_pos=jnp.zeros_like(src_seg), q_seg=tgt_segment_ids, k_seg=src_seg, causal=False)
        x = dropout(self.embed.encode(tgt_inputs_bt, pos), cfg.dropout, fold(dropout_rng, 1))
        x = self.decoder(
            x, lambda blk, x, r: blk(x, masking, enc_bsd=enc, cross_masking=cross, rng=r), fold(dropout_rng, 2)
        )
        return self._head(x)

    def init_cache(self, src_bs, length: int, *, src_segment_ids=None, dtype=None) -> KVCache:
        """Encode the source once and precompute every layer's cross-attention K/V."""
        cfg = self.cfg
        enc = self.encode(src_bs, src_segment_ids=src_segment_ids)
        src_seg = self._src_segments(src_bs, src_segment_ids)
        cache = kvcache.for_config(cfg, src_bs.shape[0], length, dtype)
        zeros = jnp.zeros_like(src_seg)
        kvs = [blk.cross_attn.key_value(enc, zeros) for blk in self.decoder.unstacked()]
        return dataclasses.replace(
            cache, cross_k=tuple(k for k, _ in kvs), cross_v=tuple(v for _, v in kvs), src_valid=src_seg != 0
        )

    def extend(self, tokens_bt, cache: KVCache, valid_bt=None, layers: list[Block] | None = None,
               visible: int | None = None):
        """Decoder-only step against the cache (see DecoderLM.extend)."""
        cfg = self.cfg
        if valid_bt is None:
            valid_bt = jnp.ones(tokens_bt.shape, bool)
        cache, pos_bt, masking = kvcache.advance(cache, valid_bt, cfg.local_window)
        cross_mask = Masking(
            q_pos=pos_bt, k_pos=jnp.zeros(cache.src_valid.shape, jnp.int32), k_seg=cache.src_valid.astype(jnp.int32),
            causal=False,
        )
        x = self.embed.encode(tokens_bt, pos_bt)
        index = cache.index - tokens_bt.shape[1]
        ks, vs = [], []
        for i, blk in enumerate(layers or self.decoder.unstacked()):
            x, k, v = blk.extend(x, masking, cache.k[i], cache.v[i], index,
                                 cross=(cache.cross_k[i], cache.cross_v[i], cross_mask), visible=visible)
            ks.append(k)
            vs.append(v)
        return self._head(x), dataclasses.replace(cache, k=tuple(ks), v=tuple(vs))

    def decode_layers(self) -> list[Block]:
        return self.decoder.unstacked()
