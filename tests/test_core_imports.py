"""The core needs only jax, flax, optax and numpy: every module of `tformer/` imports (and a model builds,
trains a step and decodes) with the experiments' and tests' packages made unimportable."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Unimportable from anywhere: what the `experiments`, `hf` and `test` extras add (orbax-checkpoint comes with flax,
# but nothing the core runs may need it). absl-py comes with optax, which imports it, so it is blocked only for
# imports made by tformer's own modules (as is everything outside jax, flax, optax, numpy and the stdlib).
NOT_CORE = ("orbax", "ml_collections", "grain", "sentencepiece", "sacrebleu", "tensorboardX",
            "matplotlib", "safetensors", "tokenizers", "torch", "transformers", "pytest")

SCRIPT = textwrap.dedent("""
    import importlib, importlib.abc, pkgutil, sys

    BLOCKED = set(sys.argv[1].split(","))  # unimportable from anywhere
    CORE = {"tformer", "jax", "jaxlib", "flax", "optax", "numpy"}  # what tformer's own modules may import

    def importer():
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
            frame = frame.f_back
        return "" if frame is None else frame.f_globals.get("__name__", "")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if top in BLOCKED:
                raise ImportError(f"{name} is blocked: the core must not need it")
            if importer().split(".")[0] == "tformer" and top not in CORE | set(sys.stdlib_module_names):
                raise ImportError(f"{importer()} imports {name}: the core imports only {sorted(CORE)}")
            return None

    sys.meta_path.insert(0, Block())
    import numpy as np
    import tformer
    from flax import nnx

    for info in pkgutil.iter_modules(tformer.__path__):
        importlib.import_module(f"tformer.{info.name}")
    cfg = tformer.ModelConfig(vocab_size=64, d_model=16, num_heads=2, num_layers=1, max_len=16)
    opt = tformer.OptimizerConfig(total_steps=2)
    graphdef, tx, state, _ = tformer.create_train_state(tformer.DecoderLM, cfg, opt, seed=0)
    batch = tformer.batch.lm_batch(np.arange(2 * 9).reshape(2, 9) % 64)
    state, metrics = tformer.make_train_step(graphdef, tx, opt)(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    model = tformer.DecoderLM(cfg, rngs=nnx.Rngs(0))
    out = tformer.generate(model, np.ones((1, 3), np.int32), tformer.Decode(max_new_tokens=4))
    leaked = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
    assert not leaked, leaked
    print("ok", out.tokens.shape)
""")


@pytest.mark.slow
def test_core_imports_and_runs_without_the_extras():
    proc = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(NOT_CORE)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
                                                       "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", "(1,", "4)"]


def test_checkpointer_without_orbax_names_the_package_to_install():
    script = textwrap.dedent("""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "orbax":
                    raise ImportError("No module named 'orbax'")
        sys.meta_path.insert(0, Block())
        from tformer.checkpoint import Checkpointer
        try:
            Checkpointer(sys.argv[1])
        except ImportError as e:
            print(e)
    """)
    proc = subprocess.run([sys.executable, "-c", script, "ckpt"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == ("tformer.checkpoint needs orbax-checkpoint (No module named 'orbax'); install it "
                                   'with `pip install orbax-checkpoint` or `pip install -e ".[experiments]"`')
