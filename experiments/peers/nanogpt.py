"""nanoGPT peer: the `GPT` and `GPTConfig` of `model.py` in a user's nanoGPT checkout (imported from there,
not copied), trained as nanoGPT's `train.py` trains it: the model's own `configure_optimizers` (AdamW, weight
decay 0.1 on matrices, betas (0.9, 0.99) as its character-level Shakespeare config), clipping at 1.0."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from experiments.peers import Shape


def load_model_module(checkout: str):
    """`model.py` of the checkout as a module of its own (its name cannot clash with anything imported)."""
    path = Path(checkout) / "model.py"
    spec = importlib.util.spec_from_file_location("nanogpt_checkout_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("GPT", "GPTConfig"):
        if not hasattr(module, name):
            raise ValueError(f"{path} has no {name}: pass the root of a nanoGPT checkout (model.py defines "
                             "GPT and GPTConfig)")
    return module


def build(checkout: str, shape: Shape):
    if shape.d_ff != 4 * shape.d_model:
        raise ValueError(f"nanoGPT's MLP is 4 x d_model = {4 * shape.d_model}, got d_ff={shape.d_ff}; "
                         "pass --override=d_ff=<4 x d_model>")
    m = load_model_module(checkout)
    model = m.GPT(m.GPTConfig(block_size=shape.seq_len, vocab_size=shape.vocab, n_layer=shape.layers,
                              n_head=shape.heads, n_embd=shape.d_model, dropout=0.0, bias=shape.bias))
    model.train()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")

    def loss_fn(x, y):
        return model(x, y)[1]

    return model, opt, loss_fn
