r"""Parallel schedules on fake CPU devices: the pipeline vs microbatches, and the ring's layouts.

    python experiments/schedules.py --what=pipeline --stages=4 --virtual_stages=1,2 --microbatches=4,8,16,32
    python experiments/schedules.py --what=ring --ring_len=8192
    python experiments/schedules.py --what=pipeline,ring --virtual_stages=1,2 --out=docs/results/schedules.json

For each (V, M) it compiles (never runs) one train step of a small
DecoderLM on a (stage S) mesh of fake CPU devices at a fixed global batch,
and prints one JSON line: compile seconds (lower + compile), the compiled
program's HLO instruction count, XLA's temporary bytes per device, and the
schedule's bubble (S - 1) / (V M + S - 1). The figures are the program's,
not a device's speed: the point is how they grow with M. `--microbatch_rows`
fixes the microbatch size instead (global batch = M x rows).

`--what=ring`: causal ring attention on a (sequence 8) mesh at T =
`--ring_len`, consecutive vs zigzag layout, in one run: the attention FLOPs
each device computes (blocks not skipped, from
`tformer.ring_attention.computed_blocks`; min / max over devices) and the
train step time of a one-layer model (best of `--repeats`, the two layouts
interleaved so load drifts hit both).

`--out`: also write every row, and the bubble (S - 1) / (V M + S - 1) for
V = 1, 2, 4 and M = 8, 16 at S = `--stages` (`tformer.pipeline.bubble_fraction`),
as one record with its measuring conditions (experiments/results.py).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python experiments/schedules.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("stages", 4, "Pipeline stages (mesh.stage); also the fake device count.")
flags.DEFINE_list("virtual_stages", ["1"], "Virtual stages V to measure (1 = GPipe).")
flags.DEFINE_list("microbatches", ["4", "8", "16", "32"], "Microbatch counts M to measure.")
flags.DEFINE_integer("batch", 32, "Global batch (fixed over M, so each microbatch has batch / M rows).")
flags.DEFINE_integer("seq_len", 64, "Sequence length.")
flags.DEFINE_integer("layers", 8, "Decoder layers (divisible by stages x every V).")
flags.DEFINE_integer("d_model", 128, "Model width.")
flags.DEFINE_integer("microbatch_rows", None, "Fix the rows per microbatch instead of the global batch.")
flags.DEFINE_list("what", ["pipeline"], "pipeline, ring.")
flags.DEFINE_integer("ring_len", 8192, "Sequence length of the ring measurement.")
flags.DEFINE_integer("repeats", 5, "Timed steps per layout (best reported).")
flags.DEFINE_string("out", None, "Also write the rows as a JSON record with conditions (e.g. "
                    "docs/results/schedules.json).")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=", re.M)


def measure(v: int, m: int) -> dict:
    import jax

    import tformer
    from tformer import sharding, training

    cfg = tformer.ModelConfig(vocab_size=512, d_model=FLAGS.d_model, num_heads=4, num_layers=FLAGS.layers,
                              max_len=FLAGS.seq_len, scan_layers=True)
    optim = training.OptimizerConfig(total_steps=10)
    mesh = sharding.make_mesh({"stage": FLAGS.stages}, devices=jax.devices()[: FLAGS.stages])
    rules = sharding.rules_for("dp")
    graphdef, abstract = training.abstract_model(tformer.DecoderLM, cfg)
    tx = training.make_optimizer(optim, abstract)
    state_sh = training.state_shardings(tformer.DecoderLM, cfg, tx, mesh, rules)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         training.abstract_train_state(abstract, tx), state_sh)
    rows = FLAGS.batch if FLAGS.microbatch_rows is None else FLAGS.microbatch_rows * m
    tok = jax.ShapeDtypeStruct((rows, FLAGS.seq_len), jax.numpy.int32)
    batch = {"inputs": tok, "targets": tok}
    batch_sh = training.batch_sharding(mesh, rules, batch)
    kw = {} if v == 1 else {"virtual_stages": v}  # V = 1 also runs on code that predates virtual stages
    step = training.make_train_step(graphdef, tx, optim, mesh=mesh, rules=rules, state_sharding=state_sh,
                              batch_sharding=batch_sh, microbatches=m, **kw)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    seconds = time.perf_counter() - t0
    s = FLAGS.stages
    return {"stages": s, "virtual_stages": v, "microbatches": m, "batch": rows, "compile_s": round(seconds, 2),
            "hlo_instructions": len(_INSTRUCTION.findall(compiled.as_text())),
            "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
            "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
            "bubble": round((s - 1) / (v * m + s - 1), 4)}


def ring(n: int = 8) -> list[dict]:
    import jax
    import numpy as np

    import tformer
    from tformer import ring_attention, sharding, training

    t, heads, head_dim = FLAGS.ring_len, 2, 32
    pos = np.arange(t, dtype=np.int32)[None]
    layouts = {"consecutive": np.arange(t), "zigzag": ring_attention.zigzag_order(t, n)}
    c = t // n // 2  # a block: half a device's slots
    block_flops = 4 * heads * c * c * head_dim  # scores and probabilities x values, forward
    mesh = sharding.make_mesh({"sequence": n}, devices=jax.devices()[:n])
    rules, optim = sharding.rules_for("dp"), training.OptimizerConfig(total_steps=10)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (1, t + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    steps, states, rows = {}, {}, {}
    for name, order in layouts.items():
        blocks = ring_attention.computed_blocks(tformer.attention.Masking(q_pos=pos[:, order], k_pos=pos[:, order]), n)
        cfg = tformer.ModelConfig(vocab_size=256, d_model=heads * head_dim, num_heads=heads, num_layers=1, max_len=t,
                                  positions="rope", sequence_layout=name, attention="einsum")
        graphdef, tx, state, state_sh = training.create_train_state(tformer.DecoderLM, cfg, optim, 0, mesh, rules)
        batch_sh = training.batch_sharding(mesh, rules, batch)
        steps[name] = training.make_train_step(graphdef, tx, optim, mesh=mesh, rules=rules, state_sharding=state_sh,
                                         batch_sharding=batch_sh, donate=False)
        states[name] = state
        put = jax.device_put(batch, batch_sh)
        jax.block_until_ready(steps[name](state, put))  # compile + warm up
        rows[name] = {"layout": name, "seq_len": t, "devices": n, "blocks_min": min(blocks), "blocks_max": max(blocks),
                      "blocks_total": sum(blocks),
                      "attention_gflops_min": round(min(blocks) * block_flops / 1e9, 3),
                      "attention_gflops_max": round(max(blocks) * block_flops / 1e9, 3), "step_s": float("inf")}
    for _ in range(FLAGS.repeats):
        for name in layouts:  # interleaved: drifting load hits both layouts alike
            t0 = time.perf_counter()
            jax.block_until_ready(steps[name](states[name], put))
            rows[name]["step_s"] = min(rows[name]["step_s"], round(time.perf_counter() - t0, 3))
    for row in rows.values():
        print(json.dumps(row), flush=True)
    return list(rows.values())


def bubbles(stages: int) -> list[dict]:
    """The schedule's bubble at `stages` for V = 1, 2, 4 and M = 8, 16: the formula the plan prints."""
    from tformer import pipeline

    return [{"stages": stages, "virtual_stages": v, "microbatches": m,
             "bubble": pipeline.bubble_fraction(stages, m, v)} for v in (1, 2, 4) for m in (8, 16)]


def main(argv):
    del argv
    record = {"ring": ring()} if "ring" in FLAGS.what else {}
    if "pipeline" in FLAGS.what:
        record["pipeline"] = []
        for v in map(int, FLAGS.virtual_stages):
            for m in map(int, FLAGS.microbatches):
                record["pipeline"].append(measure(v, m))
                print(json.dumps(record["pipeline"][-1]), flush=True)
    if FLAGS.out:
        from experiments import results

        record["bubble"] = bubbles(FLAGS.stages)
        settings = {k: getattr(FLAGS, k) for k in ("stages", "batch", "seq_len", "layers", "d_model",
                                                   "microbatch_rows", "ring_len", "repeats")}
        results.write(FLAGS.out, {"conditions": results.conditions(settings=settings), **record})
        print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    # Fake CPU devices, set before jax starts (it is first imported in `measure`).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    app.run(main)
