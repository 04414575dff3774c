"""A small encoder-decoder on the embedded numbers translation task (digits -> English): CPU, minutes."""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.model.update(kind="seq2seq", d_model=128, num_heads=4, num_layers=2, num_encoder_layers=2, d_ff=512,
                   max_len=96, positions="sinusoidal", norm="layernorm", norm_placement="pre",
                   activation="relu", tie_embeddings=True)
    c.optim.update(learning_rate=2e-3, warmup_steps=100, weight_decay=0.0, label_smoothing=0.0)
    c.data.update(corpus="numbers:digits-en", tokenizer="byte", src_len=8, tgt_len=64,
                  num_train=20_000, num_valid=500)
    c.train.update(batch_size=64, num_steps=900, log_every=100, eval_every=450, eval_batches=8,
                   checkpoint_every=450, num_samples=4, eval_decode_examples=500)
    return c
