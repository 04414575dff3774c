"""benchmark.py's PyTorch peers (experiments/peers): spec parsing, the config checks, the CPU peak, and a
pair alternated end to end with a tiny stand-in nanoGPT checkout and with the Hugging Face peer."""

import json

import pytest

from experiments import benchmark as bm
from experiments import peers, results
from tformer import flops

CPU = """processor\t: {i}
model name\t: Test CPU 9000
cpu MHz\t\t: {mhz}
physical id\t: 0
core id\t\t: {core}
flags\t\t: fpu sse2 {extra}
"""


def cpuinfo(extra: str, cores: int, smt: int = 1, mhz: float = 3000.0) -> str:
    return "\n".join(CPU.format(i=i, mhz=mhz, core=i // smt, extra=extra) for i in range(cores * smt))


def test_cpu_peak_by_isa_cores_and_clock():
    # SMT siblings share their core's FMA pipes: 4 logical CPUs on 2 cores count 2.
    p = flops.cpu_fp32_peak(cpuinfo("avx avx2 fma avx512f", cores=2, smt=2, mhz=2600.0))
    assert (p["cores"], p["flop_per_cycle"], p["isa"], p["avx512"]) == (2, 64, "avx512", True)
    assert p["gflops"] == pytest.approx(2 * 64 * 2.6, abs=0.05) and p["model"] == "Test CPU 9000"
    p = flops.cpu_fp32_peak(cpuinfo("avx avx2 fma", cores=4))
    assert (p["gflops"], p["isa"], p["avx2"], p["avx512"]) == (4 * 32 * 3.0, "avx2+fma", True, False)
    assert flops.cpu_fp32_peak(cpuinfo("avx avx2 fma", cores=4), cores=1)["gflops"] == 32 * 3.0
    assert flops.cpu_fp32_peak("processor : 0\nmodel name : some ARM board\n") is None


NANO = dict(vocab_size=65, d_model=32, num_heads=4, num_layers=2, d_ff=128, max_len=16, use_bias=False,
            activation="gelu_exact")


def test_peer_specs_and_config_mismatches_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"unknown peer 'torch'; use --peer=hf or --peer=nanogpt:<checkout path>"):
        peers.parse_peer("torch")
    with pytest.raises(ValueError, match=r"--peer=nanogpt needs the path of a nanoGPT checkout"):
        peers.parse_peer("nanogpt")
    with pytest.raises(ValueError, match=r"no model.py there; pass the root of a nanoGPT checkout"):
        peers.parse_peer(f"nanogpt:{tmp_path}")
    (tmp_path / "model.py").write_text("")
    assert peers.parse_peer(f"nanogpt:{tmp_path}") == ("nanogpt", str(tmp_path.resolve()))
    assert peers.parse_peer("hf") == ("hf", None)
    cfg = bm.model_config(bm.Options(overrides=tuple(f"{k}={v}" for k, v in NANO.items())))
    assert peers.mismatches("nanogpt", cfg) == []
    # GPT-2 (hf) has biases and the tanh GELU: this config is not its model, and the error says so.
    assert peers.mismatches("hf", cfg) == ["activation='gelu_exact' (the hf peer has 'gelu')",
                                           "use_bias=False (the hf peer has True)"]
    with pytest.raises(ValueError, match=r"Pass --override=field=value so tformer's config matches the peer's"):
        peers.shape_for("hf", cfg, 2, 16)
    rope = cfg.replace(positions="rope", d_ff=96)
    assert peers.mismatches("nanogpt", rope) == ["positions='rope' (the nanogpt peer has 'learned')",
                                                 "resolved_d_ff=96 (the nanogpt peer has 128)"]


# A stand-in for a nanoGPT checkout's model.py: its GPT/GPTConfig interface (forward(idx, targets) ->
# (logits, loss), configure_optimizers), a model small enough to build in a moment. Its parameter count
# depends on every field the peer must pass through.
FAKE_MODEL_PY = '''
from dataclasses import dataclass
import torch

@dataclass
class GPTConfig:
    block_size: int = 8
    vocab_size: int = 10
    n_layer: int = 1
    n_head: int = 1
    n_embd: int = 4
    dropout: float = 0.1
    bias: bool = True

class GPT(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.dropout == 0.0 and config.n_embd % config.n_head == 0
        self.wte = torch.nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = torch.nn.Embedding(config.block_size, config.n_embd)
        self.h = torch.nn.ModuleList(torch.nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
                                     for _ in range(config.n_layer))

    def forward(self, idx, targets=None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for layer in self.h:
            x = x + torch.tanh(layer(x))
        logits = x @ self.wte.weight.T
        return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        print("configure_optimizers prints, as nanoGPT's does")  # must not break the reply channel
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas, weight_decay=weight_decay)
'''


def test_nanogpt_pair_alternates_with_a_checkout_model(tmp_path):
    pytest.importorskip("torch", reason="the peers need torch: pip install -e .[peers]")
    (tmp_path / "model.py").write_text(FAKE_MODEL_PY)
    opts = bm.Options(overrides=tuple(f"{k}={v}" for k, v in NANO.items()), batch=2, seq_len=16, steps=2, warmup=1)
    dev = bm.device_facts(opts)
    rec = bm.bench_pair(opts, dev, f"nanogpt:{tmp_path}", rounds=3)
    assert rec["peer_shape"] == dict(vocab=65, seq_len=16, d_model=32, layers=2, heads=4, d_ff=128, batch=2,
                                     bias=False, seed=0)
    assert rec["peer_info"]["params"] == 65 * 32 + 16 * 32 + 2 * 32 * 32  # no biases: bias=False reached it
    assert rec["tformer_step_ms"]["n"] == rec["peer_step_ms"]["n"] == 6 and len(rec["speedup_rounds"]) == 3
    assert rec["speedup"] == pytest.approx(rec["peer_step_ms"]["median"] / rec["tformer_step_ms"]["median"],
                                           rel=1e-3)
    assert rec["tformer_cpu_ms"] > 0 and rec["peer_cpu_ms"] > 0
    assert rec["speedup_cpu"] == pytest.approx(rec["peer_cpu_ms"] / rec["tformer_cpu_ms"], rel=1e-2)
    cfg = bm.model_config(opts)
    assert rec["flops_per_step"] == flops.train_flops_per_token(cfg.replace(vocab_multiple=1), 16) * 2 * 16
    assert rec["tformer_gflops"] / rec["peer_gflops"] == pytest.approx(rec["speedup"], rel=1e-2)
    out = tmp_path / "results" / "peer_nanogpt.json"
    bm.write_result(str(out), rec)
    got = json.loads(out.read_text())
    assert got["pair"]["speedup"] == rec["speedup"] and got["pair"]["peer_step_ms"] == rec["peer_step_ms"]
    assert set(results.REQUIRED_CONDITIONS) | {"cpu", "avx512", "load_during_run", "torch"} <= set(
        got["conditions"])


def test_hf_peer_builds_the_same_model_as_tformer(tmp_path):
    pytest.importorskip("torch", reason="the hf peer needs torch: pip install -e .[peers]")
    pytest.importorskip("transformers", reason="the hf peer needs transformers: pip install -e .[peers]")
    opts = bm.Options(overrides=("vocab_size=100", "d_model=32", "num_layers=2", "num_heads=2", "max_len=16"),
                      batch=2, seq_len=16, steps=1, warmup=1)
    rec = bm.bench_pair(opts, bm.device_facts(opts), "hf", rounds=2)
    # Same parameters, counted by tformer's FLOP arithmetic (unpadded vocabulary, positions included).
    cfg = bm.model_config(opts).replace(vocab_multiple=1)
    assert rec["peer_info"]["params"] == flops.param_count(cfg, include_positions=True)
    assert rec["peer_step_ms"]["n"] == 2 and rec["peer"] == "hf"
