"""The recurrent baseline of lm_tiny: a 2-layer LSTM with its parameter count (0.90M), same data."""

from experiments.configs.base import TOKENIZER_FIELDS, base_config, dataclass_defaults
from tformer import rnn


def get_config():
    c = base_config()
    c.model = dataclass_defaults(rnn.RNNConfig, skip=TOKENIZER_FIELDS)  # the RNN's own fields
    c.model.update(kind="rnn_lm", vocab_size=0, d_model=229, num_layers=2, cell="lstm", max_len=128,
                   tie_embeddings=True)
    c.optim.update(learning_rate=4e-3, warmup_steps=50, weight_decay=0.1, min_lr_ratio=0.05)
    c.data.update(corpus="stdlib", tokenizer="byte", seq_len=128, max_bytes=8_000_000)
    c.train.update(batch_size=32, num_steps=500, log_every=50, eval_every=250, eval_batches=32,
                   checkpoint_every=250, sample_tokens=100)
    return c
