"""The optimizer: schedules, TensorFlow-style Adam against a float64 loop, the decay mask, and the
critic's learning-rate multiplier."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ppo_jax.optim import (
  OptimHparams,
  learning_rate,
  make_optimizer,
  scale_subtree,
  schedule_count,
)


def test_schedules_by_hand():
  """Warm-up 0 → lr over 4 steps, then constant / linear / cosine decay to 0 at step 10."""
  for schedule, after in [
    ("constant", lambda t: 1.0),
    ("linear", lambda t: 1.0 - (t - 4) / 6),
    ("cosine", lambda t: 0.5 * (1 + np.cos(np.pi * (t - 4) / 6))),
  ]:
    lr = learning_rate(OptimHparams(lr=2.0, schedule=schedule, warmup_steps=4), 10)
    got = [float(lr(t)) for t in range(11)]
    want = [2.0 * t / 4 for t in range(4)] + [2.0 * after(t) for t in range(4, 11)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=schedule)


def test_tf_style_adam_matches_a_float64_loop():
  """``m̂ / (√v̂ + ε / √(1 − β₂ᵗ))``, i.e. ε added to √v before the bias correction, over five
  steps of varying gradients (ε large enough for the difference from optax's Adam to show)."""
  b1, b2, eps, lr = 0.9, 0.99, 1e-2, 0.1
  hp = OptimHparams(
    lr=lr, schedule="constant", b1=b1, b2=b2, eps=eps, tf_style_eps=True, max_grad_norm=None
  )
  tx = make_optimizer(hp, 10)
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(5, 3)) * np.array([1e-3, 1.0, 30.0])
  params = {"w": jnp.zeros(3, jnp.float32)}
  state = tx.init(params)
  w, m, v = np.zeros(3), np.zeros(3), np.zeros(3)
  for t, g in enumerate(grads, start=1):
    upd, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    params = optax.apply_updates(params, upd)
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    lr_t = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
    w = w - lr_t * m / (np.sqrt(v) + eps)
  np.testing.assert_allclose(np.asarray(params["w"]), w, rtol=1e-5, atol=1e-7)
  plain = make_optimizer(dataclasses.replace(hp, tf_style_eps=False), 10)
  p2 = {"w": jnp.zeros(3, jnp.float32)}
  s2 = plain.init(p2)
  for g in grads:
    upd, s2 = plain.update({"w": jnp.asarray(g, jnp.float32)}, s2, p2)
    p2 = optax.apply_updates(p2, upd)
  assert not np.allclose(np.asarray(p2["w"]), w, rtol=1e-3)  # the two ε placements differ


def test_weight_decay_spares_vectors():
  hp = OptimHparams(lr=0.5, schedule="constant", weight_decay=0.1, max_grad_norm=None)
  tx = make_optimizer(hp, 10)
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
  zero = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(upd["kernel"], -0.5 * 0.1 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_array_equal(upd["bias"], 0.0)


def test_critic_lr_scale_multiplies_the_value_updates_only():
  """Three steps with and without ``scale_subtree("value", 4)``: the policy's updates are the
  same, the critic's four times as large (Adam step and weight decay alike), with the moments and
  the global gradient clipping shared."""
  hp = OptimHparams(lr=1e-2, schedule="linear", weight_decay=0.1, max_grad_norm=1.0)
  base = make_optimizer(hp, 10)
  scaled = scale_subtree(base, "value", 4.0)
  assert scale_subtree(base, "value", 1.0) is base
  rng = np.random.default_rng(1)
  params = {
    "policy": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
    "value": {"kernel": jnp.asarray(rng.normal(size=(3, 1)), jnp.float32), "bias": jnp.ones(1)},
  }
  s_base, s_scaled = base.init(params), scaled.init(params)
  for _ in range(3):
    g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 3, jnp.float32), params)
    u_base, s_base = base.update(g, s_base, params)
    u_scaled, s_scaled = scaled.update(g, s_scaled, params)
    np.testing.assert_array_equal(u_scaled["policy"]["kernel"], u_base["policy"]["kernel"])
    for name in ("kernel", "bias"):
      np.testing.assert_allclose(u_scaled["value"][name], 4 * u_base["value"][name], rtol=1e-6)
    assert float(jnp.abs(u_base["value"]["kernel"]).max()) > 0
  with pytest.raises(ValueError, match="must be > 0"):
    scale_subtree(base, "value", 0.0)


@pytest.mark.parametrize("tf_style", [True, False])
def test_schedule_count_is_the_updates_applied(tf_style):
  """The count the schedule reads: one per update, found under the critic's multiplier too, and
  not a count of Adam's (which coincides only while nothing is skipped)."""
  hp = OptimHparams(lr=1.0, schedule="linear", tf_style_eps=tf_style, weight_decay=0.1)
  tx = scale_subtree(make_optimizer(hp, 10), "value", 3.0)
  params = {"policy": {"w": jnp.ones((2, 2))}, "value": {"w": jnp.ones((2, 1))}}
  state = tx.init(params)
  for t in range(3):
    assert int(schedule_count(state)) == t
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert int(schedule_count(state)) == 3
  with pytest.raises(ValueError, match=r"expected one learning-rate schedule .* found 0"):
    schedule_count(optax.adam(1.0).init(params))
