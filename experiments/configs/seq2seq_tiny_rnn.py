"""The recurrent baseline of seq2seq_tiny: LSTM encoder-decoder with Luong attention, its parameter count (0.97M)."""

from experiments.configs.base import TOKENIZER_FIELDS, base_config, dataclass_defaults
from tformer import rnn


def get_config():
    c = base_config()
    c.model = dataclass_defaults(rnn.RNNConfig, skip=TOKENIZER_FIELDS)  # the RNN's own fields
    c.model.update(kind="rnn_seq2seq", vocab_size=0, d_model=163, num_layers=2, cell="lstm", attention="luong",
                   max_len=96, tie_embeddings=True)
    c.optim.update(learning_rate=2e-3, warmup_steps=100, weight_decay=0.0, label_smoothing=0.0)
    c.data.update(corpus="numbers:digits-en", tokenizer="byte", src_len=8, tgt_len=64,
                  num_train=20_000, num_valid=500)
    c.train.update(batch_size=64, num_steps=900, log_every=100, eval_every=450, eval_batches=8,
                   checkpoint_every=450, num_samples=4, eval_decode_examples=500)
    return c
