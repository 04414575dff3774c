"""Text in, text out: LM continuations, translations and their scores, for train.py and sample.py.

Every function takes a model (weights merged) and a tokenizer; batching,
BOS/EOS placement and length limits are handled here, so the callers deal
in strings only.
"""

from __future__ import annotations

import numpy as np

import tformer
from experiments.tokenizers import Tokenizer
from tformer import families


def encode_prompts(tok: Tokenizer, prompts: list[str], max_len: int) -> list[list[int]]:
    """BOS + ids of each prompt (as documents start in training); a prompt leaving no room fails."""
    enc = [[tok.bos_id] + list(tok.encode(p)) for p in prompts]
    for p, e in zip(prompts, enc):
        if len(e) >= max_len:
            raise ValueError(f"prompt {p[:40]!r} is {len(e)} tokens with BOS, leaving no room to generate: the "
                             f"model's max_len is {max_len}; shorten the prompt")
    return enc


def complete(model, tok: Tokenizer, prompts: list[str], max_new: int, rng, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None) -> list[str]:
    """LM continuations of `prompts`, at most `max_new` tokens and never past the model's max_len."""
    enc = encode_prompts(tok, prompts, model.cfg.max_len)
    width = max(map(len, enc))
    arr = np.zeros((len(enc), width), np.int32)
    for i, e in enumerate(enc):
        arr[i, : len(e)] = e
    n = min(max_new, model.cfg.max_len - width)
    generate = families.of_model(model).generate
    out = generate(model, arr, tformer.Decode(n), tformer.Sampling(temperature, top_k, top_p),
                   lengths=[len(e) for e in enc], rng=rng)
    return [p + tok.decode(row) for p, row in zip(prompts, np.asarray(out.tokens))]


def encode_sources(tok: Tokenizer, sources: list[str], src_len: int) -> tuple[np.ndarray, int]:
    """[B, src_len] source ids (+EOS, zero padded) and how many sources were cut to fit."""
    src = np.zeros((len(sources), src_len), np.int32)
    cut = 0
    for i, s in enumerate(sources):
        ids = list(tok.encode(s)) + [tok.eos_id]
        cut += len(ids) > src_len
        ids = ids[:src_len]
        src[i, : len(ids)] = ids
    return src, cut


def translate(model, tok: Tokenizer, sources: list[str], src_len: int, max_new: int, beam_size: int = 1) -> list[str]:
    """Greedy (beam 1) or beam-search translations of `sources` (cut to `src_len` tokens)."""
    src, _ = encode_sources(tok, sources, src_len)
    max_new = min(max_new, model.cfg.max_len - 1)
    bos = np.full((len(sources), 1), tok.bos_id, np.int32)
    family = families.of_model(model)
    if beam_size > 1:
        out = family.beam_search(model, bos, tformer.Decode(max_new), src=src, beam_size=beam_size)
    else:
        out = family.generate(model, bos, tformer.Decode(max_new), src=src)
    return [tok.decode(row) for row in np.asarray(out.tokens)]


def translation_scores(model, tok: Tokenizer, pairs: list[tuple[str, str]], src_len: int, max_new: int,
                       beam_size: int = 1, chunk: int = 256) -> dict:
    """Exact match and corpus BLEU of the translations of `pairs`' sources against their targets."""
    import sacrebleu

    hyps = []
    for i in range(0, len(pairs), chunk):
        hyps += translate(model, tok, [s for s, _ in pairs[i : i + chunk]], src_len, max_new, beam_size)
    refs = [t for _, t in pairs]
    exact = sum(h.strip() == r.strip() for h, r in zip(hyps, refs)) / len(refs)
    return {"exact_match": exact, "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score}


def sample_prompts(spec: str, limit: int) -> list[str]:
    """The non-empty `|`-separated prompts of `spec`, at most `limit`."""
    return [p for p in spec.split("|") if p][:limit]


def sample_lines(model, tok: Tokenizer, train_cfg, data_cfg, task: str, valid_pairs, rng) -> list[str]:
    """The text a run prints at its end: LM samples from its prompts (task "lm"), or translations of held-out
    pairs (task "seq2seq")."""
    t = train_cfg
    if task == "lm":
        prompts = sample_prompts(t.sample_prompts, t.num_samples)
        if not prompts:
            return []
        texts = complete(model, tok, prompts, t.sample_tokens, rng, t.temperature, t.top_k or None)
        return [f"--- sample ---\n{s}\n" for s in texts]
    pairs = valid_pairs[: t.num_samples]
    if not pairs:
        return []
    hyps = translate(model, tok, [s for s, _ in pairs], data_cfg.src_len, data_cfg.tgt_len, t.beam_size)
    return [f"{s}  ->  {h}   (reference: {ref})" for (s, ref), h in zip(pairs, hyps)]
