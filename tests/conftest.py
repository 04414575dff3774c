"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

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


# ---------------------------------------------------------------------------
# Sharded == one device, within what fp32 summation order can explain.

# A gradient entry of a sharded step and of the one-device step are the same sums in another order: they differ
# by ~sqrt(n) x 2^-24 of the terms they add, which clipping bounds by clip_norm; 1e-6 x clip_norm leaves margin.
GRAD_NOISE = 1e-6


def assert_trains_alike(got_curves, got_params, ref_curves, ref_params, opt, steps: int, what: str) -> None:
    """Per-step (loss, grad norm) and final parameters of two runs agree as far as their arithmetic allows.

    Loss and gradient norm come before the optimizer: the same fp32 sums in another order, ~1e-6 relative,
    so rtol 1e-5. Parameters start equal and take `steps` AdamW updates lr x (m / (sqrt(v) + eps) + wd x p):
    a gradient entry that moves by d moves m / (sqrt(v) + eps) by at most d / eps whatever the gradient's
    size, so the runs part by at most steps x lr x GRAD_NOISE x clip_norm / eps (3e-4 for the tests' lr 1e-2,
    eps 1e-4, 3 steps: 1% of the lr x steps a parameter can travel). A sharding bug changes gradients by O(1)
    of their size and so parameters by O(lr) each step, far beyond it. No bound scales with the parameter's
    own size: Adam's step does not.
    """
    np.testing.assert_allclose(got_curves, ref_curves, rtol=1e-5,
                               err_msg=f"{what}: per-step (loss, grad norm) differs from one device")
    atol = steps * opt.learning_rate * GRAD_NOISE * opt.clip_norm / opt.eps
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref_params))
    for path, value in jax.tree_util.tree_leaves_with_path(got_params):
        np.testing.assert_allclose(value, flat_ref[path], rtol=0, atol=atol,
                                   err_msg=f"{what}: {jax.tree_util.keystr(path)} differs after {steps} steps")
