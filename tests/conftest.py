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
