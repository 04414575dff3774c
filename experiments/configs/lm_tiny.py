"""A small byte-level LM on the Python standard library's source: CPU, a few minutes."""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.model.update(d_model=192, num_heads=6, num_layers=4, max_len=256, positions="rope", norm="rmsnorm",
                   activation="swiglu", d_ff=512, use_bias=False, tie_embeddings=True)
    c.optim.update(learning_rate=3e-3, warmup_steps=100, weight_decay=0.1)
    c.data.update(corpus="stdlib", tokenizer="byte", seq_len=256, max_bytes=8_000_000)
    c.train.update(batch_size=16, num_steps=1500, log_every=100, eval_every=500, eval_batches=24,
                   checkpoint_every=500)
    return c
