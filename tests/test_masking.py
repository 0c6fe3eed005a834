"""masked_mean, masked_whiten, aggregate: hand cases, float64 references, garbage, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references as ref
from cases import B, T, with_garbage

import ppo_jax as pj
from ppo_jax import masking


class TestMaskedMean:
  def test_hand_computed(self):
    x = jnp.array([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])
    m = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert float(pj.masked_mean(x, m)) == pytest.approx((1 + 2 + 30) / 3)
    np.testing.assert_allclose(pj.masked_mean(x, m, axis=-1), [1.5, 30.0])
    np.testing.assert_allclose(pj.masked_mean(x, m, axis=0), [1.0, 2.0, 30.0])

  def test_reference_and_garbage(self, mask):
    x = np.random.default_rng(0).normal(size=(B, T))
    got = pj.masked_mean(with_garbage(x, mask), mask)
    assert float(got) == pytest.approx(ref.masked_mean(x, mask), abs=1e-6)

  def test_all_masked_is_zero_with_finite_gradient(self):
    x = jnp.full((2, 3), jnp.inf)
    m = jnp.zeros((2, 3))
    assert float(pj.masked_mean(x, m)) == 0.0
    grad = jax.grad(lambda x: pj.masked_mean(x, m))(jnp.ones((2, 3)))
    np.testing.assert_array_equal(grad, 0.0)

  def test_nan_and_inf_at_masked_positions_do_not_leak(self):
    x = jnp.array([[1.0, jnp.nan, jnp.inf, 3.0]])
    m = jnp.array([[1.0, 0.0, 0.0, 1.0]])
    assert float(pj.masked_mean(x, m)) == 2.0
    assert bool(jnp.all(jnp.isfinite(jax.grad(lambda x: pj.masked_mean(x, m))(x))))

  def test_bool_and_float_masks_agree(self, mask):
    x = np.random.default_rng(1).normal(size=(B, T))
    assert float(pj.masked_mean(x, mask)) == float(pj.masked_mean(x, mask > 0))

  def test_jit(self, mask):
    x = np.random.default_rng(2).normal(size=(B, T))
    got = jax.jit(pj.masked_mean, static_argnames="axis")(x, mask, axis=-1)
    want = [ref.masked_mean(x[b], mask[b]) for b in range(B)]
    np.testing.assert_allclose(got, want, atol=1e-6)

  def test_shape_mismatch_is_a_clear_error(self):
    with pytest.raises(ValueError, match=r"x\[2, 3\], mask\[2, 4\]"):
      pj.masked_mean(jnp.ones((2, 3)), jnp.ones((2, 4)))


class TestMaskedWhiten:
  def test_hand_computed(self):
    x = jnp.array([[1.0, 3.0, 99.0]])
    m = jnp.array([[1.0, 1.0, 0.0]])
    # mean 2, unbiased var ((−1)² + 1²) / 1 = 2.
    s = np.sqrt(2.0 + 1e-8)
    np.testing.assert_allclose(pj.masked_whiten(x, m), [[-1 / s, 1 / s, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(
      pj.masked_whiten(x, m, shift_mean=False), [[2 - 1 / s, 2 + 1 / s, 0.0]], rtol=1e-6
    )

  @pytest.mark.parametrize("shift_mean", [True, False])
  def test_reference_and_garbage(self, mask, shift_mean):
    x = np.random.default_rng(3).normal(loc=2.0, scale=3.0, size=(B, T))
    got = jax.jit(pj.masked_whiten, static_argnames="shift_mean")(
      with_garbage(x, mask), mask, shift_mean=shift_mean
    )
    np.testing.assert_allclose(got, ref.masked_whiten(x, mask, shift_mean), rtol=1e-5, atol=1e-5)

  def test_whitened_moments(self):
    rng = np.random.default_rng(4)
    x = rng.normal(loc=5.0, scale=4.0, size=(8, 16))
    m = (rng.random((8, 16)) < 0.6).astype(np.float32)
    w = np.asarray(pj.masked_whiten(x, m))
    vals = w[m > 0]
    assert abs(vals.mean()) < 1e-5
    assert vals.std(ddof=1) == pytest.approx(1.0, rel=1e-4)
    np.testing.assert_array_equal(w[m == 0], 0.0)

  def test_all_masked_and_single_token_are_finite(self):
    for m in (jnp.zeros((2, 3)), jnp.zeros((2, 3)).at[1, 1].set(1.0)):
      x = jnp.arange(6.0).reshape(2, 3)
      out = pj.masked_whiten(x, m)
      grad = jax.grad(lambda x, m=m: jnp.sum(pj.masked_whiten(x, m)))(x)
      assert bool(jnp.all(jnp.isfinite(out))) and bool(jnp.all(jnp.isfinite(grad)))
      np.testing.assert_array_equal(out, 0.0)

  @pytest.mark.parametrize("value", [5.3, 1000.1, 12345.6, -7e5])
  def test_equal_entries_whiten_to_exactly_zero(self, value):
    """The float32 mean of equal values can be off by an ulp; 1/√(0 + 1e-8) must not blow that up
    (it made ±0.87 out of 100 copies of 1000.1)."""
    x = jnp.full((4, 25), value, jnp.float32).at[0, 0].set(jnp.nan)
    m = jnp.ones((4, 25)).at[0, 0].set(0.0)
    np.testing.assert_array_equal(pj.masked_whiten(x, m), 0.0)
    np.testing.assert_array_equal(
      pj.masked_whiten(x, m, shift_mean=False)[m > 0], np.float32(value)
    )
    assert float(masking.masked_var(x, m)) == 0.0

  def test_large_offset_keeps_float32_accuracy(self):
    """Centred on a real entry first: an offset of 1e4 costs no more than its ulp (1e-3)."""
    rng = np.random.default_rng(8)
    x = 1e4 + rng.normal(size=(6, 9))
    m = (rng.random((6, 9)) < 0.7).astype(np.float64)
    got = pj.masked_whiten(x.astype(np.float32), m)
    np.testing.assert_allclose(got, ref.masked_whiten(x, m, True), atol=2e-3)


class TestMaskedVar:
  def test_reference_and_garbage(self, mask):
    """Bessel's correction by default (ddof 1, as TRL whitens and ``masked_whiten`` reads it),
    ddof 0 with ``unbiased=False`` (lm-human-preferences); 0 where no entry (ddof 0) or fewer
    than two (ddof 1) are real. Against NumPy's variance of the real entries, in float64."""
    x = np.random.default_rng(6).normal(loc=3.0, scale=2.0, size=(B, T))
    real = x[mask > 0]
    dirty = with_garbage(x, mask)
    want = real.var(ddof=1) if real.size > 1 else 0.0
    assert float(pj.masked_var(dirty, mask)) == pytest.approx(want, rel=1e-5, abs=1e-6)
    want = real.var(ddof=0) if real.size else 0.0
    got = pj.masked_var(dirty, mask, unbiased=False)
    assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-6)

  def test_hand_computed(self):
    x = jnp.array([[1.0, 3.0, 99.0], [5.0, -7.0, 2.0]])
    m = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # real entries 1, 3, 2: mean 2, squared deviations 1 + 1 + 0 = 2.
    assert float(pj.masked_var(x, m)) == pytest.approx(2 / 2)
    assert float(pj.masked_var(x, m, unbiased=False)) == pytest.approx(2 / 3)


class TestAggregate:
  @pytest.mark.parametrize("agg", masking.AGG_MODES)
  def test_reference(self, mask, agg):
    loss = np.random.default_rng(5).normal(size=(B, T))
    as_dict = {(b, t): loss[b, t] for b in range(B) for t in range(T)}
    got = jax.jit(pj.aggregate, static_argnames="agg")(with_garbage(loss, mask), mask, agg=agg)
    assert float(got) == pytest.approx(ref.aggregate(as_dict, mask, agg), abs=1e-5)

  def test_hand_computed(self):
    loss = jnp.array([[1.0, 3.0, 0.0], [6.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    m = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert float(pj.aggregate(loss, m, agg="token-mean")) == pytest.approx(10 / 3)
    assert float(pj.aggregate(loss, m, agg="seq-mean-token-mean")) == pytest.approx((2 + 6) / 2)
    assert float(pj.aggregate(loss, m, agg="seq-mean-token-sum")) == pytest.approx((4 + 6) / 2)
    assert float(pj.agg_weight(m, agg="token-mean")) == 3.0
    assert float(pj.agg_weight(m, agg="seq-mean-token-sum")) == 2.0

  def test_unknown_mode(self):
    with pytest.raises(ValueError, match="unknown agg 'mean'"):
      pj.aggregate(jnp.ones((1, 2)), jnp.ones((1, 2)), agg="mean")
    with pytest.raises(ValueError, match="unknown agg"):
      pj.agg_weight(jnp.ones((1, 2)), agg="sum")


@pytest.mark.parametrize("fn", ["var", "whiten", "whiten_keep_mean"])
def test_inf_and_nan_at_masked_positions_reach_no_gradient_of_var_or_whiten(fn):
  """The gradient with inf/nan where the mask is 0 is the gradient with zeros there."""
  f = {
    "var": lambda x, m: masking.masked_var(x, m),
    "whiten": lambda x, m: jnp.sum(masking.masked_whiten(x, m) * jnp.arange(1.0, 5.0)),
    "whiten_keep_mean": lambda x, m: jnp.sum(
      masking.masked_whiten(x, m, shift_mean=False) * jnp.arange(1.0, 5.0)
    ),
  }[fn]
  m = jnp.array([[1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]]).reshape(2, 4)
  clean = jnp.array([[1.0, 0.0, 0.0, 3.0], [2.0, 0.0, -1.0, 4.0]])
  dirty = clean.at[0, 1].set(jnp.inf).at[0, 2].set(jnp.nan).at[1, 1].set(-jnp.inf)
  want = jax.grad(f)(clean, m)
  assert bool(jnp.all(jnp.isfinite(want))) and float(jnp.abs(want).sum()) > 0
  np.testing.assert_array_equal(jax.grad(f)(dirty, m), want)
