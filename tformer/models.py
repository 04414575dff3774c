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
import operator
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
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

    def _in(self, x, norm):
        """A sublayer's input: normalised first under pre-LN."""
        return norm(x) if self.cfg.norm_placement == "pre" else x

    def _out(self, x, y, norm, rng):
        """Add a sublayer's output `y` to the residual `x` (normalising after, under post-LN)."""
        y = dropout(y, self.cfg.dropout, rng)
        return x + y if self.cfg.norm_placement == "pre" else norm(x + y)

    def __call__(self, x_btd, masking: Masking, *, enc_bsd=None, cross_masking=None, rng=None,
                 cache: LayerCache | None = None):
        """The layer on every position at once, or (with `cache`) on new tokens against cached K/V.

        Without a cache: returns x. With one: the new tokens' K/V are written at
        `cache.index` first and the layer returns (x, k_bskd, v_bskd), the
        updated cache arrays; cross-attention reads the cached cross K/V.
        """
        h = self._in(x_btd, self.attn_norm)
        if cache is None:
            y = self.attn(h, masking, rng=fold(rng, 0))
        else:
            y, k_bskd, v_bskd = self._cached_self_attention(h, masking, cache)
        x = self._out(x_btd, y, self.attn_norm, fold(rng, 1))
        if self.has_cross:
            h = self._in(x, self.cross_norm)
            if cache is None:
                y = self.cross_attn(h, cross_masking, kv_src=enc_bsd, rng=fold(rng, 2))
            else:
                y = self.cross_attn.output(attend(self.cross_attn.query(h, masking.q_pos), cache.cross_k,
                                                  cache.cross_v, cross_masking, self.cfg))
            x = self._out(x, y, self.cross_norm, fold(rng, 3))
        x = self._out(x, self.mlp(self._in(x, self.mlp_norm)), self.mlp_norm, fold(rng, 4))
        if cache is None:
            return constrain(x, ("batch", "length", "act_embed"))
        return x, k_bskd, v_bskd

    def _cached_self_attention(self, h_btd, masking: Masking, cache: LayerCache):
        """Self-attention of new tokens over the cache after writing their K/V: (y, k_bskd, v_bskd)."""
        q = self.attn.query(h_btd, masking.q_pos)
        k_new, v_new = self.attn.key_value(h_btd, masking.q_pos)
        k_bskd, v_bskd = kvcache.write(cache.k, k_new, cache.index), kvcache.write(cache.v, v_new, cache.index)
        k_att, v_att, m = k_bskd, v_bskd, masking
        if cache.visible is not None and cache.visible < k_att.shape[1]:
            k_att, v_att, m = k_att[:, :cache.visible], v_att[:, :cache.visible], masking.first_keys(cache.visible)
        return self.attn.output(attend(q, k_att, v_att, m, self.cfg, q_offset=cache.index)), k_bskd, v_bskd


@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's view of a KV cache for `Block.__call__`: K/V [B, S, K, D], the slot to write new tokens at,
    an encoder-decoder's cross K/V, and `visible` (static): attend over slots [0, visible) only, the caller
    guaranteeing every slot the new tokens may see lies below it."""

    k: jax.Array
    v: jax.Array
    index: jax.Array
    cross_k: jax.Array | None = None
    cross_v: jax.Array | None = None
    visible: int | None = None


# fn(block_i, x, rng_i) -> x: one layer of a stack, with its dropout key (None = no dropout).
LayerFn = Callable[[Block, jax.Array, jax.Array | None], jax.Array]


def run_layers(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, fn: LayerFn, cfg: ModelConfig,
               rng: jax.Array | None = None, first_layer: int | jax.Array = 0) -> jax.Array:
    """x <- fn(block_i, x, rng_i) for each of the stacked layers in `state` (leading `layers` axis).

    The one stack body: scanned (`cfg.scan_layers`) or unrolled, rematerialised
    by `cfg.remat`; layer i draws its dropout from fold(rng, first_layer + i),
    so a pipeline stage holding layers [first_layer, ...) draws what the whole
    stack would.
    """

    def body(x: jax.Array, inp: tuple[nnx.State, jax.Array]) -> tuple[jax.Array, None]:
        layer_state, i = inp
        return fn(nnx.merge(graphdef, layer_state), x, fold(rng, i)), None

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
    n = jax.tree.leaves(state)[0].shape[0]
    layer_ids = first_layer + jnp.arange(n)
    if cfg.scan_layers:
        return jax.lax.scan(body, x, (state, layer_ids))[0]
    for i in range(n):
        x, _ = body(x, (jax.tree.map(operator.itemgetter(i), state), layer_ids[i]))
    return x


class Stack(nnx.Module):
    """`n` blocks whose weights are stacked on a leading `layers` axis."""

    def __init__(self, cfg: ModelConfig, n: int, *, rngs: nnx.Rngs, cross: bool = False, encoder: bool = False):
        self.cfg, self.n = cfg, n

        # nnx.vmap adds the leading `layers` axis to every weight's sharding metadata.
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(key: jax.Array) -> Block:
            return Block(cfg, rngs=nnx.Rngs(key), cross=cross, encoder=encoder)

        self.layers = make(jax.random.split(rngs.params(), n))

    def __call__(self, x, fn, rng=None):
        """x <- fn(block_i, x, rng_i) for each layer (`run_layers`)."""
        graphdef, state = nnx.split(self.layers)
        return run_layers(graphdef, state, x, fn, self.cfg, rng)

    def unstacked(self) -> list[Block]:
        """Per-layer blocks (sliced once, e.g. before a decode loop)."""
        graphdef, state = nnx.split(self.layers)
        return [nnx.merge(graphdef, jax.tree.map(operator.itemgetter(i), state)) for i in range(self.n)]


def positions_or_default(tokens_bt: jax.Array, positions_bt: jax.Array | None) -> jax.Array:
    if positions_bt is not None:
        return positions_bt
    b, t = tokens_bt.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def check_tokens(tokens: jax.Array, cfg: ModelConfig, name: str = "tokens") -> None:
    """Shape, length and (when the values are concrete, not traced inside jit) the id range."""
    if tokens.ndim != 2:
        raise ValueError(f"{name} must be [batch, length], got shape {tokens.shape}")
    if tokens.shape[1] > cfg.max_len:
        raise ValueError(
            f"sequence length {tokens.shape[1]} exceeds ModelConfig.max_len={cfg.max_len}; "
            "shorten the input or build the model with a larger max_len"
        )
    if isinstance(tokens, jax.core.Tracer) or tokens.size == 0:
        return
    ids = np.asarray(tokens)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= cfg.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")


def _has_final_norm(cfg: ModelConfig) -> bool:
    return cfg.norm_placement == "pre" and cfg.final_norm


class _Transformer(nnx.Module):
    """What both models share: the embedding, the decoder path (parallel or cached) and the head.

    Subclasses set `task` ("lm" | "seq2seq": the batch layout they train on, the explicit way
    to tell them apart, equal to `ModelConfig.task`) and `decoder_stack`.
    """

    task: ClassVar[str]
    cfg: ModelConfig
    embed: Embedder

    @property
    def decoder_stack(self) -> Stack:
        """The decoder's layer stack; each model class names its own (abstract here)."""
        raise NotImplementedError(f"{type(self).__name__} must define decoder_stack")

    def _head(self, x_btd):
        if _has_final_norm(self.cfg):
            x_btd = self.final_norm(x_btd)
        return self.embed.attend(x_btd)

    def _decoder(self, tokens_bt, pos_bt, masking: Masking, *, enc_bsd=None, cross_masking=None, rng=None,
                 cache: KVCache | None = None, layers: list[Block] | None = None, visible: int | None = None):
        """The one decoder path: embed, blocks, head -> (logits [B, T, V], cache or None).

        Without `cache`: every position at once (the stacked blocks, scanned or
        unrolled). With `cache` (already advanced past these T tokens by
        `kvcache.advance`): each block writes the new tokens' K/V and attends
        over the cache; an encoder-decoder's cross K/V come from the cache.
        """
        x = dropout(self.embed.encode(tokens_bt, pos_bt), self.cfg.dropout, fold(rng, 0))
        if cache is None:
            def run_block(blk: Block, x: jax.Array, r: jax.Array | None) -> jax.Array:
                return blk(x, masking, enc_bsd=enc_bsd, cross_masking=cross_masking, rng=r)

            return self._head(self.decoder_stack(x, run_block, fold(rng, 1))), None
        index = cache.index - tokens_bt.shape[1]
        ks, vs = [], []
        for i, blk in enumerate(layers or self.decoder_stack.unstacked()):
            cross = (None, None) if cross_masking is None else (cache.cross_k[i], cache.cross_v[i])
            layer_cache = LayerCache(cache.k[i], cache.v[i], index, *cross, visible=visible)
            x, k, v = blk(x, masking, cross_masking=cross_masking, cache=layer_cache)
            ks.append(k)
            vs.append(v)
        return self._head(x), dataclasses.replace(cache, k=tuple(ks), v=tuple(vs))

    def extend(self, tokens_bt: jax.Array, cache: KVCache, valid_bt: jax.Array | None = None,
               layers: list[Block] | None = None, visible: int | None = None):
        """Run T new tokens against the cache: (logits [B, T, V], new cache).

        `valid_bt` marks real tokens (False = left padding of a short prompt).
        `layers` lets a decode loop pass blocks unstacked once, outside the loop.
        `visible` (static): self-attention reads cache slots [0, visible) only,
        so a decode loop need not read the slots it has not filled yet.
        """
        if valid_bt is None:
            valid_bt = jnp.ones(tokens_bt.shape, bool)
        cache, pos_bt, masking = kvcache.advance(cache, valid_bt, self.cfg.local_window)
        cross_masking = None
        if self.task == "seq2seq":
            cross_masking = Masking(q_pos=pos_bt, k_pos=jnp.zeros(cache.src_valid.shape, jnp.int32),
                                    k_seg=cache.src_valid.astype(jnp.int32), causal=False)
        return self._decoder(tokens_bt, pos_bt, masking, cross_masking=cross_masking, cache=cache, layers=layers,
                             visible=visible)

    def decode_layers(self) -> list[Block]:
        """The decoder's blocks sliced per layer (once, before a decode loop)."""
        return self.decoder_stack.unstacked()

    def _empty_cache(self, batch: int, length: int, dtype) -> KVCache:
        return kvcache.for_config(self.cfg, batch, length, dtype)


class DecoderLM(_Transformer):
    """Decoder-only language model (GPT-2 / Llama family, by config)."""

    task: ClassVar[str] = "lm"

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.task != "lm":
            raise ValueError(f"ModelConfig.num_encoder_layers={cfg.num_encoder_layers}: a DecoderLM has no encoder; "
                             "set it to 0 or build an EncoderDecoder")
        self.cfg = cfg
        self.embed = Embedder(cfg, rngs=rngs)
        self.blocks = Stack(cfg, cfg.num_layers, rngs=rngs)
        if _has_final_norm(cfg):
            self.final_norm = Norm(cfg, rngs=rngs)

    @property
    def decoder_stack(self) -> Stack:
        return self.blocks

    def __call__(self, tokens_bt, *, positions=None, segment_ids=None, dropout_rng=None):
        """Logits [B, T, padded_vocab] for every position at once (causal).

        `segment_ids` ([B, T], 0 = padding) keep packed documents apart and
        `positions` restart per document; both default to one plain sequence.
        Token ids are range-checked when concrete (not when traced inside jit).
        """
        check_tokens(tokens_bt, self.cfg)
        pos = positions_or_default(tokens_bt, positions)
        masking = self_masking(pos, segment_ids, self.cfg, causal=True, default_positions=positions is None)
        return self._decoder(tokens_bt, pos, masking, rng=dropout_rng)[0]

    def init_cache(self, batch: int, length: int, dtype: jnp.dtype | None = None) -> KVCache:
        return self._empty_cache(batch, length, dtype)


class EncoderDecoder(_Transformer):
    """The original Transformer: bidirectional encoder, causal decoder with cross-attention.

    Source and target share one vocabulary and one embedding table.
    """

    task: ClassVar[str] = "seq2seq"

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.num_encoder_layers < 1:
            raise ValueError("ModelConfig.num_encoder_layers: EncoderDecoder needs >= 1 encoder layer")
        self.cfg = cfg
        self.embed = Embedder(cfg, rngs=rngs)
        self.encoder = Stack(cfg, cfg.num_encoder_layers, rngs=rngs, encoder=True)
        self.decoder = Stack(cfg, cfg.num_layers, rngs=rngs, cross=True)
        if _has_final_norm(cfg):
            self.encoder_norm = Norm(cfg, rngs=rngs)
            self.final_norm = Norm(cfg, rngs=rngs)

    @property
    def decoder_stack(self) -> Stack:
        return self.decoder

    def _src_segments(self, src_bs, src_segment_ids):
        if src_segment_ids is not None:
            return src_segment_ids
        return (src_bs != self.cfg.pad_id).astype(jnp.int32)

    def encode(self, src_bs: jax.Array, *, src_segment_ids: jax.Array | None = None,
               src_positions: jax.Array | None = None, dropout_rng: jax.Array | None = None) -> jax.Array:
        """Encoder output [B, S, D]; every source position in one pass.

        Source padding is `pad_id` unless `src_segment_ids` says otherwise.
        """
        cfg = self.cfg
        check_tokens(src_bs, cfg, "src")
        seg = self._src_segments(src_bs, src_segment_ids)
        pos = positions_or_default(src_bs, src_positions)
        masking = self_masking(pos, seg, cfg, causal=False)

        def run_block(blk: Block, x: jax.Array, r: jax.Array | None) -> jax.Array:
            return blk(x, masking, rng=r)

        x = dropout(self.embed.encode(src_bs, pos), cfg.dropout, fold(dropout_rng, 0))
        x = self.encoder(x, run_block, fold(dropout_rng, 1))
        return self.encoder_norm(x) if _has_final_norm(cfg) else x

    def __call__(self, src_bs, tgt_inputs_bt, *, src_segment_ids=None, tgt_segment_ids=None,
                 tgt_positions=None, src_positions=None, dropout_rng=None):
        """Teacher-forced logits [B, T, V]: `tgt_inputs` is the target shifted right after BOS.

        Packed pairs: target segment i attends to source segment i (equal ids);
        pass `src_positions` / `tgt_positions` restarting at each segment.
        """
        cfg = self.cfg
        check_tokens(tgt_inputs_bt, cfg, "tgt_inputs")
        enc = self.encode(src_bs, src_segment_ids=src_segment_ids, src_positions=src_positions,
                          dropout_rng=fold(dropout_rng, 0))
        src_seg = self._src_segments(src_bs, src_segment_ids)
        pos = positions_or_default(tgt_inputs_bt, tgt_positions)
        masking = self_masking(pos, tgt_segment_ids, cfg, causal=True, default_positions=tgt_positions is None)
        cross = Masking(q_pos=pos, k_pos=jnp.zeros_like(src_seg), q_seg=tgt_segment_ids, k_seg=src_seg, causal=False)
        return self._decoder(tgt_inputs_bt, pos, masking, enc_bsd=enc, cross_masking=cross,
                             rng=fold(dropout_rng, 1))[0]

    def init_cache(self, src_bs: jax.Array, length: int, *, src_segment_ids: jax.Array | None = None,
                   dtype: jnp.dtype | None = None) -> KVCache:
        """Encode the source once and precompute every layer's cross-attention K/V."""
        enc = self.encode(src_bs, src_segment_ids=src_segment_ids)
        src_seg = self._src_segments(src_bs, src_segment_ids)
        zeros = jnp.zeros_like(src_seg)
        kvs = [blk.cross_attn.key_value(enc, zeros) for blk in self.decoder.unstacked()]
        return dataclasses.replace(
            self._empty_cache(src_bs.shape[0], length, dtype), cross_k=tuple(k for k, _ in kvs),
            cross_v=tuple(v for _, v in kvs), src_valid=src_seg != 0,
        )
