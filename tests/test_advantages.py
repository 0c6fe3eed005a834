"""gae, group_advantages, rloo_advantages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references as ref
from cases import B, T, with_garbage

import ppo_jax as pj

gae_jit = jax.jit(pj.gae, static_argnames=("gamma", "lam"))


class TestGae:
  def test_hand_computed(self):
    # One row, three real tokens then padding; γ = 0.5, λ = 0.5.
    r = jnp.array([[1.0, 0.0, 2.0, 7.0]])
    v = jnp.array([[0.5, 1.0, 1.0, 9.0]])
    m = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    # δ₂ = 2 − 1 = 1 (no bootstrap past the last real token); Â₂ = 1.
    # δ₁ = 0 + 0.5·1 − 1 = −0.5; Â₁ = −0.5 + 0.25·1 = −0.25.
    # δ₀ = 1 + 0.5·1 − 0.5 = 1; Â₀ = 1 + 0.25·(−0.25) = 0.9375.
    adv, ret = pj.gae(r, v, m, gamma=0.5, lam=0.5)
    np.testing.assert_allclose(adv, [[0.9375, -0.25, 1.0, 0.0]])
    np.testing.assert_allclose(ret, [[1.4375, 0.75, 2.0, 0.0]])

  @pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 0.0), (1.0, 1.0)])
  def test_reference_and_garbage(self, mask, gamma, lam):
    rng = np.random.default_rng(0)
    r, v = rng.normal(size=(2, B, T))
    adv, ret = gae_jit(
      with_garbage(r, mask, 1), with_garbage(v, mask, 2), mask, gamma=gamma, lam=lam
    )
    want_adv, want_ret = ref.gae(r, v, mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)

  def test_lambda_one_gives_discounted_return_minus_value(self):
    rng = np.random.default_rng(1)
    r, v = rng.normal(size=(2, 3, 6))
    m = np.ones((3, 6))
    adv, ret = pj.gae(r, v, m, gamma=0.9, lam=1.0)
    disc = np.array(
      [[sum(0.9**k * r[b, t + k] for k in range(6 - t)) for t in range(6)] for b in range(3)]
    )
    np.testing.assert_allclose(ret, disc, rtol=1e-5)
    np.testing.assert_allclose(adv, disc - v, rtol=1e-5, atol=1e-6)

  def test_lambda_zero_gives_td_error(self):
    rng = np.random.default_rng(2)
    r, v = rng.normal(size=(2, 2, 5))
    adv, _ = pj.gae(r, v, np.ones((2, 5)), gamma=0.8, lam=0.0)
    next_v = np.concatenate([v[:, 1:], np.zeros((2, 1))], axis=1)
    np.testing.assert_allclose(adv, r + 0.8 * next_v - v, rtol=1e-5, atol=1e-6)

  def test_all_masked_and_gradient_finite(self):
    m = jnp.zeros((2, 4))
    r = jnp.full((2, 4), jnp.nan)
    adv, ret = pj.gae(r, r, m, gamma=1.0, lam=0.95)
    np.testing.assert_array_equal(adv, 0.0)
    np.testing.assert_array_equal(ret, 0.0)
    grad = jax.grad(lambda v: jnp.sum(pj.gae(jnp.ones((2, 4)), v, m, gamma=1.0, lam=0.9)[0]))(
      jnp.ones((2, 4))
    )
    assert bool(jnp.all(jnp.isfinite(grad)))

  def test_is_one_scan(self):
    jaxpr = jax.make_jaxpr(lambda r, v, m: pj.gae(r, v, m, gamma=1.0, lam=0.95))(
      jnp.ones((2, 9)), jnp.ones((2, 9)), jnp.ones((2, 9))
    )
    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["reverse"]

  def test_shape_error(self):
    with pytest.raises(ValueError, match=r"rewards\[2, 3\], values\[2, 4\]"):
      pj.gae(jnp.ones((2, 3)), jnp.ones((2, 4)), jnp.ones((2, 3)), gamma=1.0, lam=1.0)
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\], got 1.5"):
      pj.gae(x, x, x, gamma=1.5, lam=1.0)
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\], got -1"):
      pj.gae(x, x, x, gamma=1.0, lam=-1.0)


class TestGroupAdvantages:
  @pytest.mark.parametrize("group_size", [2, 4, 8])
  @pytest.mark.parametrize("normalize_std", [True, False])
  @pytest.mark.parametrize("std_scope", ["group", "batch"])
  def test_reference_under_jit(self, group_size, normalize_std, std_scope):
    scores = np.random.default_rng(3).normal(loc=1.0, scale=2.0, size=16)
    static = ("group_size", "normalize_std", "std_scope")
    f = jax.jit(pj.group_advantages, static_argnames=static)
    got = f(scores, group_size=group_size, normalize_std=normalize_std, std_scope=std_scope)
    want = ref.group_advantages(scores, group_size, normalize_std, std_scope)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def test_batch_scope_leaves_a_group_of_near_equal_scores_small(self):
    """Liu et al.'s batch std: a group whose scores differ by 1e-3 gets ±1e-3 / σ_batch, where
    its own std would blow it up to ±0.7; a tied batch gives zeros with a finite gradient."""
    scores = jnp.array([0.0, 1e-3, -3.0, 3.0])
    group = pj.group_advantages(scores, 2)
    batch = pj.group_advantages(scores, 2, std_scope="batch")
    assert abs(float(group[0])) == pytest.approx(0.7071, rel=1e-2)  # 1e-6 in the std: 0.706
    assert abs(float(batch[0])) < 1e-3 and abs(float(batch[3])) == pytest.approx(3 / 2.45, rel=1e-2)
    tied = jax.grad(lambda s: jnp.sum(pj.group_advantages(s, 2, std_scope="batch")))(jnp.ones(4))
    assert np.isfinite(np.asarray(tied)).all()
    np.testing.assert_array_equal(pj.group_advantages(jnp.ones(4), 2, std_scope="batch"), 0.0)
    with pytest.raises(ValueError, match=r"^std_scope: unknown 'all'; expected 'group' or 'batch'"):
      pj.group_advantages(scores, 2, std_scope="all")

  def test_the_run_hands_the_scope_to_group_advantages(self):
    from ppo_jax.hparams import PPOHparams
    from ppo_jax.rollout import group_relative

    scores, mask = jnp.array([0.0, 1e-3, -3.0, 3.0]), jnp.ones((4, 2))
    for scope in ("group", "batch"):
      hp = PPOHparams(estimator="grpo", group_size=2, group_std_scope=scope)
      adv, _ = group_relative(scores, mask, hp=hp)
      np.testing.assert_allclose(adv[:, 0], pj.group_advantages(scores, 2, std_scope=scope))

  def test_hand_computed_and_constant_group(self):
    got = pj.group_advantages(jnp.array([0.0, 2.0, 4.0, 5.0, 5.0, 5.0]), 3)
    np.testing.assert_allclose(got, [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(
      pj.group_advantages(jnp.array([0.0, 2.0, 4.0]), 3, normalize_std=False), [-2.0, 0.0, 2.0]
    )

  def test_a_tied_group_has_a_finite_gradient(self):
    """√ at 0: the gradient through a group of equal scores was NaN (and leaked into others)."""
    scores = jnp.array([1.0, 1.0, 0.0, 2.0])
    grad = jax.grad(lambda s: jnp.sum(pj.group_advantages(s, 2) * jnp.arange(4.0)))(scores)
    assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad[2:]).sum()) > 0
    jac = jax.jacfwd(lambda s: pj.group_advantages(s, 2))(jnp.array([1.0, 1.0]))
    assert np.isfinite(np.asarray(jac)).all()

  def test_errors(self):
    with pytest.raises(ValueError, match="5 scores do not split into groups of 2"):
      pj.group_advantages(jnp.ones(5), 2)
    with pytest.raises(ValueError, match="group_size must be an int ≥ 2"):
      pj.group_advantages(jnp.ones(4), 1)


class TestRlooAdvantages:
  @pytest.mark.parametrize("group_size", [2, 3, 6])
  def test_reference_under_jit(self, group_size):
    scores = np.random.default_rng(4).normal(size=12)
    got = jax.jit(pj.rloo_advantages, static_argnames="group_size")(scores, group_size)
    np.testing.assert_allclose(got, ref.rloo_advantages(scores, group_size), rtol=1e-5, atol=1e-6)

  def test_hand_computed_and_zero_sum(self):
    got = pj.rloo_advantages(jnp.array([1.0, 2.0, 6.0, 3.0, 3.0, 3.0]), 3)
    np.testing.assert_allclose(got, [-3.0, -1.5, 4.5, 0.0, 0.0, 0.0])
    # Leave-one-out advantages are (k / (k−1)) times the mean-centred scores.
    s = np.random.default_rng(5).normal(size=8)
    np.testing.assert_allclose(
      pj.rloo_advantages(s, 4), pj.group_advantages(s, 4, normalize_std=False) * 4 / 3, rtol=1e-5
    )

  def test_errors(self):
    with pytest.raises(ValueError, match="group_size must be an int ≥ 2"):
      pj.rloo_advantages(jnp.ones(4), 1)
    with pytest.raises(ValueError, match=r"expected scores \[N\]"):
      pj.rloo_advantages(jnp.ones((2, 2)), 2)
