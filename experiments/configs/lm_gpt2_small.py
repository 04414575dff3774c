"""GPT-2 small (124M) for one GPU/TPU host: bf16 compute, fp32 master weights."""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.model.update(vocab_size=0, d_model=768, num_heads=12, num_layers=12, max_len=1024, positions="learned",
                   norm="layernorm", activation="gelu", use_bias=True, tie_embeddings=True,
                   dtype="bfloat16", param_dtype="float32", attention="auto")
    c.optim.update(learning_rate=6e-4, warmup_steps=700, weight_decay=0.1, b2=0.95, min_lr_ratio=0.1)
    c.data.update(corpus="stdlib", tokenizer="sentencepiece", vocab_size=32768, seq_len=1024)
    c.train.update(batch_size=16, num_steps=20_000, log_every=100, eval_every=1000, checkpoint_every=1000)
    return c
