"""Hypothesis property tests over shapes, masks and values for the maths layer."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import references as ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import ppo_jax as pj
from ppo_jax import masking

# Each new shape compiles once (the functions are jitted below), so shapes stay small and few.
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# 0 or magnitudes in [1e-3, 5]: near XLA's float32 flush-to-zero range, products of tiny values
# round to 0 in float32 but not in the float64 reference, and "which term is larger" flips.
finite = st.one_of(
  st.just(0.0),
  st.builds(lambda x, sign: sign * x, st.floats(1e-3, 5.0), st.sampled_from([-1, 1])),
)
policy_loss = jax.jit(pj.policy_loss, static_argnames=("agg", "dual_clip"))
value_loss = jax.jit(pj.value_loss, static_argnames=("clip_eps",))
gae = jax.jit(pj.gae, static_argnames=("gamma", "lam"))


@st.composite
def batches(draw, n_arrays: int):
  """(mask [B, T], *arrays [B, T]) with B in [1, 3], T in [1, 5] and any 0/1 mask."""
  b = draw(st.integers(1, 3))
  t = draw(st.integers(1, 5))
  mask = draw(arrays(np.float32, (b, t), elements=st.sampled_from([0.0, 1.0])))
  xs = [draw(arrays(np.float64, (b, t), elements=finite)) for _ in range(n_arrays)]
  return (mask, *xs)


@SETTINGS
@given(batches(2), st.sampled_from(masking.AGG_MODES), st.sampled_from([None, 3.0]))
def test_policy_loss_matches_reference(data, agg, dual_clip):
  mask, delta, adv = data
  old = np.full_like(delta, -1.0)
  logp = old + 0.5 * delta
  loss, metrics = policy_loss(logp, old, adv, mask, agg=agg, dual_clip=dual_clip)
  want, want_metrics = ref.policy_loss(logp, old, adv, mask, agg=agg, dual_clip=dual_clip)
  np.testing.assert_allclose(float(loss), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(metrics["clipfrac"]), want_metrics["clipfrac"], atol=1e-6)
  assert 0.0 <= float(metrics["clipfrac"]) <= 1.0
  assert float(metrics["approx_kl"]) >= 0.0


@SETTINGS
@given(batches(3), st.sampled_from([0.2, None]))
def test_value_loss_matches_reference_and_is_nonnegative(data, clip_eps):
  mask, values, old, returns = data
  loss, _ = value_loss(values, old, returns, mask, clip_eps=clip_eps)
  want, _ = ref.value_loss(values, old, returns, mask, clip_eps)
  np.testing.assert_allclose(float(loss), want, rtol=1e-4, atol=1e-5)
  assert float(loss) >= 0.0


@SETTINGS
@given(batches(2), st.sampled_from([0.9, 1.0]), st.sampled_from([0.0, 0.95, 1.0]))
def test_gae_matches_reference_and_ignores_masked_values(data, gamma, lam):
  mask, rewards, values = data
  adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
  want_adv, want_ret = ref.gae(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(adv, want_adv, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ret, want_ret, rtol=1e-4, atol=1e-4)
  flipped = np.where(mask > 0, values, -values + 7.0)
  np.testing.assert_array_equal(gae(rewards, flipped, mask, gamma=gamma, lam=lam)[0], adv)


@SETTINGS
@given(batches(1))
def test_whiten_matches_reference(data):
  mask, x = data
  np.testing.assert_allclose(
    pj.masked_whiten(x, mask), ref.masked_whiten(x, mask), rtol=1e-4, atol=1e-3
  )


@partial(jax.jit, static_argnames="agg")
def _policy_grad(logp, old, adv, mask, *, agg):
  return jax.grad(lambda lp: pj.policy_loss(lp, old, adv, mask, agg=agg)[0])(logp)


@SETTINGS
@given(batches(2), st.sampled_from(masking.AGG_MODES))
def test_gradients_are_finite_and_vanish_at_masked_positions(data, agg):
  mask, logp, adv = data
  old = np.zeros_like(logp)
  grad = _policy_grad(jnp.asarray(logp, jnp.float32), old, adv, mask, agg=agg)
  assert bool(jnp.all(jnp.isfinite(grad)))
  np.testing.assert_array_equal(np.asarray(grad)[mask == 0], 0.0)


@SETTINGS
@given(st.integers(1, 4), st.integers(2, 5), st.data())
def test_group_baselines_are_centred(n_groups, group_size, data):
  scores = data.draw(arrays(np.float64, (n_groups * group_size,), elements=finite))
  for adv in (
    pj.rloo_advantages(scores, group_size),
    pj.group_advantages(scores, group_size, normalize_std=False),
  ):
    sums = np.asarray(adv).reshape(n_groups, group_size).sum(1)
    np.testing.assert_allclose(sums, 0.0, atol=1e-4)
  np.testing.assert_allclose(
    pj.group_advantages(scores, group_size),
    ref.group_advantages(scores, group_size),
    rtol=1e-3,
    atol=1e-3,
  )
