"""Hugging Face GPT-2 peer: `transformers`' GPT2LMHeadModel from a config (random init, no download), eager
PyTorch with SDPA attention, fp32, AdamW (weight decay 0.1 on matrices, none on biases and LayerNorms, as
the HF Trainer groups them)."""

from __future__ import annotations

from experiments.peers import Shape


def build(shape: Shape):
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    cfg = GPT2Config(vocab_size=shape.vocab, n_positions=shape.seq_len, n_embd=shape.d_model, n_layer=shape.layers,
                     n_head=shape.heads, n_inner=shape.d_ff, activation_function="gelu_new", resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.1), dict(params=rest, weight_decay=0.0)],
                            lr=3e-4, betas=(0.9, 0.95))

    def loss_fn(x, y):
        # GPT-2's own loss: logits at every position, labels = next token (HF shifts `labels` by one,
        # so pass the inputs; `y` is unused and the loss covers T - 1 positions).
        return model(input_ids=x, labels=x).loss

    return model, opt, loss_fn

