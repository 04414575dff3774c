"""Fine-tune a pretrained checkpoint: pass --config.init_from=hf:<dir> (or a tformer workdir).

The model section stays at its defaults on purpose: the architecture comes from
the checkpoint, and an architecture field set here to a different value would
be an error. Runtime fields (dtype, attention, remat, scan_layers) may be set.
Add --config.train.lora_rank=8 to train LoRA adapters only.
"""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.optim.update(learning_rate=1e-4, warmup_steps=20, weight_decay=0.0, min_lr_ratio=0.1)
    c.data.update(corpus="stdlib", seq_len=256, max_bytes=2_000_000)
    c.train.update(batch_size=8, num_steps=500, log_every=10, eval_every=100, eval_batches=16, checkpoint_every=100,
                   sample_tokens=60)
    return c
