"""tformer.reductions: the same sums, maxima and softmax as jnp's, and on CPU each one fused kernel."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tformer import host, reductions


@pytest.mark.parametrize("n", [64, 128, 96, 65, 16])  # folds to 32, to 24, odd (jnp's), short (jnp's)
def test_row_reductions_and_softmax_are_jnps_with_gradients(n):
    ks = jax.random.split(jax.random.key(n), 2)
    x = 3 * jax.random.normal(ks[0], (2, 3, n)) + 100.0  # far from zero: exp(x) alone would overflow
    ct = jax.random.normal(ks[1], x.shape)
    np.testing.assert_allclose(reductions.row_sum(x), jnp.sum(x, -1, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(reductions.row_max(x), jnp.max(x, -1, keepdims=True))
    got, vjp = jax.vjp(jax.jit(reductions.softmax), x)
    want, vjp_ref = jax.vjp(lambda x: jax.nn.softmax(x, axis=-1), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(vjp(ct)[0], vjp_ref(ct)[0], rtol=1e-4, atol=1e-7)


def test_sum_of_squares_is_jnps():
    x = jax.random.normal(jax.random.key(0), (4, 64, 32))
    for a in (x, x[0, :5, :13], jnp.asarray(2.0)):
        np.testing.assert_allclose(reductions.sum_of_squares(a), jnp.sum(a * a), rtol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the folding is CPU-only")
def test_on_cpu_softmax_over_64_keys_runs_without_a_reduce_window():
    options = host.cpu_compiler_options(128)  # a narrow model's: YNNPACK takes the dots, XLA the reductions
    if not options:
        pytest.skip("this jaxlib has no YNNPACK fusion option")
    x = jax.random.normal(jax.random.key(1), (12, 4, 64, 64))

    def hlo(f):
        return jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(f(x))))).lower(x).compile(compiler_options=options).as_text()

    # XLA:CPU splits jnp's max and sums over 64 into reduce-windows; the folded rows never are.
    assert re.search(r"reduce-window\(", hlo(lambda x: jax.nn.softmax(x, axis=-1)))
    assert not re.search(r"reduce-window\(", hlo(reductions.softmax))
