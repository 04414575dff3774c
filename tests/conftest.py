"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tformer.config import ModelConfig

V = 120  # test vocabulary: not a multiple of vocab_multiple, so padded ids are always present


def make_cfg(**kw) -> ModelConfig:
    """The small model the model and generation tests share (a large init spreads the logits)."""
    base = dict(vocab_size=V, d_model=32, num_heads=4, num_layers=1, d_ff=64, max_len=24, vocab_multiple=64,
                init_std=0.3)
    base.update(kw)
    return ModelConfig(**base)


def greedy_by_full_forward(model, prefix_ids, max_new: int, eos_id: int, src_bs=None) -> list[int]:
    """Greedy tokens after `prefix_ids`, the slow way: the whole sequence through the model's parallel
    (teacher-forced) forward at every step, no cache and no decode loop; stops after EOS. The reference the
    runner's decoding (tformer.generate, the RNNs' carried state) must agree with."""
    import numpy as np

    ids, new = list(prefix_ids), []
    for _ in range(max_new):
        x_bt = np.asarray([ids], np.int32)
        logits_btv = model(x_bt) if src_bs is None else model(src_bs, x_bt)
        nxt = int(np.argmax(np.asarray(logits_btv[0, -1, : model.cfg.vocab_size])))
        new.append(nxt)
        if nxt == eos_id:
            break
        ids.append(nxt)
    return new


def lm_eval_by_full_forward(model, config, workdir) -> tuple[float, float]:
    """(mean NLL per scored token, bits per byte) of an LM run's eval batches, recomputed outside the runner:
    the same splits rebuilt, each batch through the model's forward, log-softmax in numpy."""
    import numpy as np

    from experiments import input_pipeline
    from experiments.tasks import build_task

    task = build_task(config, workdir)
    nll = weight = 0.0
    batches = input_pipeline.eval_batches(task.valid, config.train.eval_batch_size or config.train.batch_size)
    for _, b in zip(range(config.train.eval_batches), batches):
        logits = np.asarray(model(b["inputs"], positions=b["positions"], segment_ids=b["segment_ids"]), np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(np.sum(np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0] * b["weights"]))
        weight += float(np.sum(b["weights"]))
    return nll / weight, input_pipeline.bits_per_byte(nll, weight, task.valid)


def pytest_sessionfinish(session, exitstatus):
    """In CI every dependency is installed (`.[test]`), so a skip there hides a failure: fail the run."""
    if not os.environ.get("CI") or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        reasons = sorted({str(getattr(r, "longrepr", r))[:200] for r in skipped})
        print(f"\n{len(skipped)} test(s) skipped in CI, where nothing should be:\n" + "\n".join(reasons))
        session.exitstatus = 1
