"""The original Transformer base (Vaswani et al. 2017): 6+6 layers, d 512, 8 heads, post-LN, GPU/TPU."""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.model.update(kind="seq2seq", d_model=512, num_heads=8, d_ff=2048, num_layers=6, num_encoder_layers=6,
                   max_len=256, positions="sinusoidal", norm="layernorm", norm_placement="post",
                   activation="relu", use_bias=True, tie_embeddings=True, scale_embeddings=True,
                   dropout=0.1, dtype="bfloat16")
    c.optim.update(learning_rate=7e-4, warmup_steps=4000, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.0,
                   schedule="cosine", label_smoothing=0.1)
    c.data.update(corpus="numbers:en-zh", tokenizer="sentencepiece", vocab_size=8192, src_len=128, tgt_len=128)
    c.train.update(batch_size=256, num_steps=100_000, log_every=200, eval_every=5000, checkpoint_every=5000,
                   beam_size=4)
    return c
