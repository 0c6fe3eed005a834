"""The optimizer: schedules, TensorFlow-style Adam against a float64 loop, the decay mask, and
the actor-critic optimizer (an Adam state and schedule per part, the critic's rate multiplier)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ppo_jax.optim import (
  OptimHparams,
  horizon_change,
  learning_rate,
  make_actor_critic_optimizer,
  make_optimizer,
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


def _actor_critic_params(rng):
  return {
    "policy": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "bias": jnp.ones(2)},
    "value": {"kernel": jnp.asarray(rng.normal(size=(3, 1)), jnp.float32), "bias": jnp.ones(1)},
  }


@pytest.mark.parametrize("tf_style", [True, False])
def test_actor_critic_optimizer_is_make_optimizer_with_equal_steps(tf_style):
  """Three steps against ``make_optimizer`` over the whole tree: with scale 1 the same updates bit
  for bit; with ``value_lr_scale=4`` the policy's the same and the critic's four times as large
  (Adam step and weight decay alike). The clipping is joint: a gradient large in the critic
  alone shrinks the policy's update too."""
  hp = OptimHparams(lr=1e-2, schedule="linear", weight_decay=0.1, tf_style_eps=tf_style)
  base = make_optimizer(hp, 10)
  same = make_actor_critic_optimizer(hp, policy_steps=10, value_steps=10)
  scaled = make_actor_critic_optimizer(hp, policy_steps=10, value_steps=10, value_lr_scale=4.0)
  rng = np.random.default_rng(1)
  params = _actor_critic_params(rng)
  s_base, s_same, s_scaled = base.init(params), same.init(params), scaled.init(params)
  for _ in range(3):
    g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 3, jnp.float32), params)
    u_base, s_base = base.update(g, s_base, params)
    u_same, s_same = same.update(g, s_same, params)
    u_scaled, s_scaled = scaled.update(g, s_scaled, params)
    for a, b in zip(jax.tree.leaves(u_base), jax.tree.leaves(u_same), strict=True):
      np.testing.assert_array_equal(a, b)
    for name in ("kernel", "bias"):
      np.testing.assert_array_equal(u_scaled["policy"][name], u_base["policy"][name])
      np.testing.assert_allclose(u_scaled["value"][name], 4 * u_base["value"][name], rtol=1e-6)
    assert float(jnp.abs(u_base["value"]["kernel"]).max()) > 0
  with pytest.raises(ValueError, match="must be > 0"):
    make_actor_critic_optimizer(hp, policy_steps=10, value_steps=10, value_lr_scale=0.0)


def test_actor_critic_parts_count_their_own_updates():
  """The critic updates three times while the policy's part of the state is kept (a critic
  warm-up); then the policy's first update is Adam's first, at the start of its own schedule:
  the one a fresh optimizer gives for the same (jointly clipped) gradient, while the critic's
  schedule is three steps on."""
  hp = OptimHparams(lr=1.0, schedule="linear", max_grad_norm=None)
  tx = make_actor_critic_optimizer(hp, policy_steps=4, value_steps=8, value_lr_scale=2.0)
  rng = np.random.default_rng(2)
  params = _actor_critic_params(rng)
  grads = lambda: jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
  state = fresh = tx.init(params)
  for _ in range(3):
    _, new = tx.update(grads(), state, params)
    # what train_step does during the warm-up: the policy's part stays
    state = jax.tree_util.tree_map_with_path(
      lambda path, a, b: b if any(getattr(k, "key", None) == "policy" for k in path) else a,
      new,
      state,
    )
  assert int(schedule_count(state)) == 0  # the policy's
  g = grads()
  u, state = tx.update(g, state, params)
  u_fresh, _ = tx.update(g, fresh, params)
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(u["policy"][name], u_fresh["policy"][name])
    # Adam's first step is ±lr·sign(g) (up to ε); the rate at count 0 is lr.
    np.testing.assert_allclose(u["policy"][name], -np.sign(g["policy"][name]), rtol=1e-5)
  value_count = [
    int(v)
    for path, v in optax.tree.get_all_with_path(state, "count")
    if any(getattr(k, "key", None) == "value" for k in path)
  ]
  assert value_count == [4, 4]  # Adam's and the schedule's
  assert int(schedule_count(state)) == 1


@pytest.mark.parametrize("tf_style", [True, False])
def test_schedule_count_is_the_updates_applied(tf_style):
  """The count the schedule reads: one per update (the policy's, with separate parts), and not
  a count of Adam's (which coincides only while nothing is skipped)."""
  hp = OptimHparams(lr=1.0, schedule="linear", tf_style_eps=tf_style, weight_decay=0.1)
  params = {"policy": {"w": jnp.ones((2, 2))}, "value": {"w": jnp.ones((2, 1))}}
  for tx in (
    make_optimizer(hp, 10),
    make_actor_critic_optimizer(hp, policy_steps=10, value_steps=10, value_lr_scale=3.0),
  ):
    state = tx.init(params)
    for t in range(3):
      assert int(schedule_count(state)) == t
      _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert int(schedule_count(state)) == 3
  with pytest.raises(ValueError, match=r"expected one learning-rate schedule .* found 0"):
    schedule_count(optax.adam(1.0).init(params))


def test_horizon_change_names_the_rate_before_and_after():
  """A linear decay over 10 updates stretched to 20: at update 5 the rate is 0.75, not 0.5; during
  a warm-up the rate stays, and the new end is still named. The same end changes nothing, nor
  does a constant schedule's, unless the stage's length had cut its warm-up."""
  hp = OptimHparams(lr=1.0, schedule="linear")
  assert horizon_change(hp, 5, old_steps=10, new_steps=20) == (
    "linear schedule decays to 0 at update 20, not 10: its rate at update 5 is 0.75, not 0.5"
  )
  warm = dataclasses.replace(hp, warmup_steps=4)
  assert horizon_change(warm, 2, old_steps=10, new_steps=20) == (
    "linear schedule decays to 0 at update 20, not 10: its rate at update 2 stays 0.5"
  )
  assert horizon_change(hp, 5, old_steps=10, new_steps=10) is None
  constant = dataclasses.replace(hp, schedule="constant")
  assert horizon_change(constant, 5, old_steps=10, new_steps=20) is None
  cut = dataclasses.replace(constant, warmup_steps=10)  # 4 updates in a 5-update stage
  assert horizon_change(cut, 4, old_steps=5, new_steps=20) == (
    "constant schedule warms up over 10 updates, not 4 (a warm-up is cut to fit its stage): its "
    "rate at update 4 is 0.4, not 1"
  )
  assert horizon_change(cut, 4, old_steps=20, new_steps=30) is None


def test_a_warmup_longer_than_the_stage_is_cut_to_reach_the_rate():
  """warmup_steps=10 in a 5-step stage (SFT on a small file): the warm-up is cut to 4 steps, so
  the last step runs at the full rate, not at 0.4 of it."""
  lr = learning_rate(OptimHparams(lr=1.0, warmup_steps=10, schedule="constant"), 5)
  assert [float(lr(i)) for i in range(5)] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_gradients_are_clipped_by_their_global_norm_before_adam():
  """The default max_grad_norm 1: each gradient scaled by min(1, 1/‖g‖₂) over the whole tree
  (not per element), then Adam, against a float64 loop."""
  hp = OptimHparams(lr=1.0, schedule="constant")
  assert hp.max_grad_norm == 1.0
  tx = make_optimizer(hp, 10)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  w, m, v = np.zeros(2), np.zeros(2), np.zeros(2)
  for t, g in enumerate(np.array([[30.0, 40.0], [0.3, 0.1], [3.0, -4.0]]), 1):
    updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    params = optax.apply_updates(params, updates)
    g = g * min(1.0, 1.0 / np.linalg.norm(g))  # ‖(30, 40)‖ = 50 → (0.6, 0.8); (0.3, 0.1) kept
    m, v = hp.b1 * m + (1 - hp.b1) * g, hp.b2 * v + (1 - hp.b2) * g * g
    w = w - (m / (1 - hp.b1**t)) / (np.sqrt(v / (1 - hp.b2**t)) + hp.eps)
  np.testing.assert_allclose(np.asarray(params["w"]), w, rtol=1e-4)


def test_the_critics_schedule_runs_over_its_own_step_count():
  """policy_steps 4, value_steps 8 (a critic warm-up trains the critic longer): the critic's
  linear decay is half way at its fifth update (rate 0.5), not at its end."""
  hp = OptimHparams(lr=1.0, schedule="linear", max_grad_norm=None)
  tx = make_actor_critic_optimizer(hp, policy_steps=4, value_steps=8)
  params = {"policy": {"w": jnp.zeros(1)}, "value": {"w": jnp.zeros(1)}}
  state = tx.init(params)
  ones = jax.tree.map(jnp.ones_like, params)
  for _ in range(5):
    updates, state = tx.update(ones, state, params)
  # Adam's first steps on a constant gradient move by the rate itself: 1 − 4/8.
  np.testing.assert_allclose(updates["value"]["w"], [-0.5], rtol=1e-4)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_a_traced_horizon_is_the_schedule_of_that_length(schedule):
  """``learning_rate(hp, T)`` with ``T`` traced (one compiled function for every ``T``) gives the
  rates of ``T`` given as an int, including a warm-up cut to fit (T ≤ warmup_steps) and T = 1."""
  hp = OptimHparams(lr=2.0, schedule=schedule, warmup_steps=4)
  rates = jax.jit(lambda t, total: learning_rate(hp, total)(t))
  for total in (1, 3, 5, 12):
    want = [float(learning_rate(hp, total)(t)) for t in range(total + 2)]
    got = [float(rates(t, np.int32(total))) for t in range(total + 2)]
    assert got == want, total
  assert rates._cache_size() == 1


def test_an_update_given_a_horizon_is_the_optimizers_of_that_length():
  """``tx.update(..., horizon=T)`` (a scalar; per part for the actor-critic optimizer) updates as
  the optimizer built for ``T`` updates does (to float32 rounding: XLA may fold the rate of a
  constant ``T`` at compile time), and one compiled update serves every ``T``; without
  ``horizon``, the optimizer's own length."""
  hp = OptimHparams(lr=1e-2, schedule="cosine", warmup_steps=2, weight_decay=0.1)
  rng = np.random.default_rng(3)
  params = _actor_critic_params(rng)
  grads = [
    jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    for _ in range(4)
  ]
  moved = make_optimizer(hp, 100)
  parts = make_actor_critic_optimizer(hp, policy_steps=100, value_steps=100)
  for tx, horizon, built in [
    (moved, np.int32(6), make_optimizer(hp, 6)),
    (parts, {"policy": np.int32(6), "value": np.int32(9)}, None),
  ]:
    if built is None:
      built = make_actor_critic_optimizer(hp, policy_steps=6, value_steps=9)
    update = jax.jit(lambda g, s, h, tx=tx: tx.update(g, s, params, horizon=h))
    s_moved, s_built = tx.init(params), built.init(params)
    for g in grads:
      u_moved, s_moved = update(g, s_moved, horizon)
      u_built, s_built = built.update(g, s_built, params)
      for a, b in zip(jax.tree.leaves(u_moved), jax.tree.leaves(u_built), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    other = jax.tree.map(lambda h: h + 1, horizon)
    update(grads[0], s_moved, other)
    assert update._cache_size() == 1
  state = moved.init(params)
  for g in grads[:3]:  # past the warm-up
    _, state = moved.update(g, state, params)
  u_own, u_100, u_6 = (
    tx.update(grads[3], state, params)[0]
    for tx in (moved, make_optimizer(hp, 100), make_optimizer(hp, 6))
  )
  np.testing.assert_array_equal(u_own["value"]["kernel"], u_100["value"]["kernel"])
  assert not np.allclose(u_own["value"]["kernel"], u_6["value"]["kernel"], rtol=1e-2)
  with pytest.raises(ValueError, match=r"^horizon: an optimizer of parts takes one per part"):
    parts.update(grads[0], parts.init(params), params, horizon=np.int32(6))


def test_hyperparameters_out_of_range_are_refused():
  """An unknown schedule, a negative rate or a negative warm-up: one line naming the field."""
  for kw, message in [
    ({"schedule": "exponential"}, r"^schedule: unknown 'exponential'; expected one of constant, "),
    ({"lr": -1e-5}, r"^lr: must be ≥ 0, got -1e-05$"),
    ({"warmup_steps": -1}, r"^warmup_steps: must be ≥ 0, got -1$"),
  ]:
    with pytest.raises(ValueError, match=message):
      OptimHparams(**kw)
