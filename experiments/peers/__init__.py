"""PyTorch peers for `experiments/benchmark.py --peer=...`: the same model, trained as its authors train it.

A peer runs in a child process (`python -m experiments.peers SPEC`) that builds its model once, then
serves blocks of timed train steps on request, so `benchmark.py` alternates tformer's steps and the
peer's (A, B, A, B ...) in one run while each side keeps its own warm threads and caches. Peers:

- `hf`: Hugging Face `transformers` GPT-2, eager PyTorch with SDPA attention (`experiments/peers/hf_gpt2.py`).
- `nanogpt:<checkout>`: the `GPT` / `GPTConfig` of `model.py` in a user's nanoGPT checkout, with that
  file's own `configure_optimizers` (AdamW), as nanoGPT's `train.py` runs it (`experiments/peers/nanogpt.py`).

Each peer step is forward + loss, backward, gradient clipping at norm 1.0, AdamW, `zero_grad(set_to_none=True)`:
what tformer's step does (clipping included). Needs torch (and transformers for `hf`): `pip install -e .[peers]`.
This module itself imports neither, so `benchmark.py` stays importable without them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PEER_NAMES = ("hf", "nanogpt")


@dataclasses.dataclass(frozen=True)
class Shape:
    """The model and batch a peer builds: a GPT-2 layout (learned positions, pre-LN, tied embeddings)."""

    vocab: int
    seq_len: int
    d_model: int
    layers: int
    heads: int
    d_ff: int
    batch: int
    bias: bool
    seed: int = 0


def parse_peer(spec: str) -> tuple[str, str | None]:
    """"hf" -> ("hf", None); "nanogpt:/path/to/nanoGPT" -> ("nanogpt", that path)."""
    name, _, arg = spec.partition(":")
    if name not in PEER_NAMES:
        raise ValueError(f"--peer={spec!r}: unknown peer {name!r}; use --peer=hf or --peer=nanogpt:<checkout path>")
    if name == "nanogpt":
        if not arg:
            raise ValueError("--peer=nanogpt needs the path of a nanoGPT checkout: --peer=nanogpt:<path> "
                             "(the directory holding its model.py)")
        if not (Path(arg) / "model.py").is_file():
            raise ValueError(f"--peer=nanogpt:{arg}: no model.py there; pass the root of a nanoGPT checkout")
        return name, str(Path(arg).resolve())
    if arg:
        raise ValueError(f"--peer={spec!r}: the hf peer takes no argument; use --peer=hf")
    return name, None


def mismatches(name: str, cfg) -> list[str]:
    """How the tformer config `cfg` differs from what peer `name` can build (empty: the same model).

    Both peers are GPT-2 layouts: learned positions, pre-LN LayerNorm, tied embeddings, no dropout, full
    causal attention. GPT-2 (hf) uses the tanh GELU and biases; nanoGPT the exact (erf) GELU and a 4x MLP.
    """
    want = dict(positions="learned", norm="layernorm", norm_placement="pre", tie_embeddings=True, dropout=0.0,
                attention_dropout=0.0, kv_heads=cfg.num_heads, local_window=None, final_norm=True,
                scale_embeddings=False, mlp_rank=None, gated=False)
    if name == "hf":
        want.update(activation="gelu", use_bias=True)
    else:
        want.update(activation="gelu_exact", resolved_d_ff=4 * cfg.d_model)
    return [f"{k}={getattr(cfg, k)!r} (the {name} peer has {v!r})" for k, v in want.items() if getattr(cfg, k) != v]


def shape_for(name: str, cfg, batch: int, seq_len: int, seed: int = 0) -> Shape:
    """The peer's `Shape` for tformer config `cfg`; a config the peer cannot mirror raises, naming the fix."""
    diff = mismatches(name, cfg)
    if diff:
        raise ValueError(f"--peer={name} builds a different model than this config: {'; '.join(diff)}. "
                         "Pass --override=field=value so tformer's config matches the peer's.")
    return Shape(vocab=cfg.vocab_size, seq_len=seq_len, d_model=cfg.d_model, layers=cfg.num_layers,
                 heads=cfg.num_heads, d_ff=cfg.resolved_d_ff, batch=batch, bias=cfg.use_bias, seed=seed)


class PeerProcess:
    """A peer in a child process: `block(steps)` runs that many train steps there and returns their ms."""

    def __init__(self, name: str, arg: str | None, shape: Shape, tune_allocator: bool):
        spec = dict(name=name, arg=arg, shape=dataclasses.asdict(shape), tune_allocator=tune_allocator)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-m", "experiments.peers", json.dumps(spec)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._reply()  # versions, threads, parameter count: sent once the model is built

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                rec = json.loads(line)
                if "error" in rec:
                    self.close()
                    raise RuntimeError(f"peer {self.name}: {rec['error']}")
                return rec
        code = self.proc.wait()
        raise RuntimeError(f"peer {self.name} exited (status {code}) before replying; its stderr is above")

    def block(self, steps: int, warmup: int = 0) -> dict:
        """Run `warmup` untimed then `steps` timed train steps; {"times_ms": [...], "cpu_ms": ..., "loss": ...}
        (`cpu_ms`: the child's CPU time per timed step, all its threads)."""
        self.proc.stdin.write(json.dumps(dict(steps=steps, warmup=warmup)) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    @contextlib.contextmanager
    def stopped(self):
        """The child stopped (SIGSTOP) for the duration: between its blocks PyTorch's OpenMP threads spin
        waiting for work by default, and would take a core from the other side's timed block."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
