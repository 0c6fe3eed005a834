"""kl_estimate (k1, k2, k3) and adaptive_kl_update."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references as ref

import ppo_jax as pj


class TestKlEstimate:
  @pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
  def test_reference_under_jit(self, kind):
    rng = np.random.default_rng(0)
    logp, ref_logp = rng.normal(size=(2, 2, 6)) - 2.0
    got = jax.jit(pj.kl_estimate, static_argnames="kind")(logp, ref_logp, kind=kind)
    want = np.vectorize(lambda a, b: ref.kl(a, b, kind))(logp, ref_logp)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  def test_hand_computed(self):
    d = math.log(2.0)  # π = 0.5, π_ref = 0.25
    got = {
      k: float(pj.kl_estimate(math.log(0.5), math.log(0.25), kind=k)) for k in ("k1", "k2", "k3")
    }
    assert got["k1"] == pytest.approx(d)
    assert got["k2"] == pytest.approx(d * d / 2)
    assert got["k3"] == pytest.approx(0.5 - 1 + d)

  def test_equal_policies_give_zero(self):
    x = jnp.linspace(-5.0, -0.1, 12).reshape(3, 4)
    for kind in ("k1", "k2", "k3"):
      np.testing.assert_array_equal(pj.kl_estimate(x, x, kind=kind), 0.0)

  @pytest.mark.parametrize("kind", ["k1", "k3"])
  def test_unbiased_estimators_match_exact_kl(self, kind):
    """Sampling from π, the mean of k1 and k3 is KL(π ‖ π_ref) (k2 is biased)."""
    key_p, key_r, key_s = jax.random.split(jax.random.key(0), 3)
    logp_V = jax.nn.log_softmax(jax.random.normal(key_p, (16,)))
    ref_V = jax.nn.log_softmax(logp_V + 0.3 * jax.random.normal(key_r, (16,)))
    exact = float(jnp.sum(jnp.exp(logp_V) * (logp_V - ref_V)))
    y = jax.random.categorical(key_s, logp_V, shape=(400_000,))
    est = float(jnp.mean(pj.kl_estimate(logp_V[y], ref_V[y], kind=kind)))
    assert est == pytest.approx(exact, rel=0.05)

  @pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
  def test_gradient_of_each_estimator_as_a_loss(self, kind):
    """On-policy, ``E_{y~π}[∇_θ k(y)]`` (exact over a 6-token vocabulary, float64 NumPy on the
    other side): k1's is 0 whatever π_ref, k2's is ∇KL(π ‖ π_ref), k3's is ∇KL(π_ref ‖ π) (Tang
    & Munos 2025). Why ``PPOHparams`` refuses k1 with ``kl_mode="loss"``."""
    rng = np.random.default_rng(0)
    theta, ref_logits = rng.normal(size=6), rng.normal(size=6)
    ref_V = np.log(np.exp(ref_logits) / np.exp(ref_logits).sum())

    def expected_estimate(th):  # Σ_y π_old(y)·k(y), with π_old = π at θ held fixed
      logp_V = jax.nn.log_softmax(th)
      weights = jax.lax.stop_gradient(jnp.exp(logp_V))
      return jnp.sum(weights * pj.kl_estimate(logp_V, jnp.asarray(ref_V), kind=kind))

    with jax.enable_x64(True):
      got = np.asarray(jax.grad(expected_estimate)(jnp.asarray(theta, jnp.float64)))
    p = np.exp(theta) / np.exp(theta).sum()
    r = np.exp(ref_V)
    log_ratio = np.log(p) - ref_V
    # ∇_θ of a softmax's functions: ∂ log p_y / ∂θ_j = 1[y = j] − p_j.
    jac = np.eye(6) - p[None, :]  # [y, j]
    want = {
      "k1": np.zeros(6),
      "k2": (p * (log_ratio + 1)) @ jac,  # ∇ Σ p log(p / r)
      "k3": -(r @ jac),  # ∇ Σ r log(r / p)
    }[kind]
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert kind == "k1" or np.abs(want).max() > 0.05

  def test_unknown_kind(self):
    with pytest.raises(ValueError, match="unknown KL estimator kind 'k4'"):
      pj.kl_estimate(jnp.zeros(3), jnp.zeros(3), kind="k4")


class TestAdaptiveKl:
  @pytest.mark.parametrize("observed", [0.0, 3.0, 5.9, 6.0, 6.6, 7.5, 100.0])
  def test_reference(self, observed):
    got = jax.jit(pj.adaptive_kl_update, static_argnames=("target", "horizon"))(
      0.2, observed, 512, target=6.0, horizon=10_000
    )
    assert float(got) == pytest.approx(ref.adaptive_kl(0.2, observed, 512, 6.0, 10_000), rel=1e-6)

  def test_direction_and_clip(self):
    up = float(pj.adaptive_kl_update(1.0, 1e9, 100, target=1.0, horizon=100))
    down = float(pj.adaptive_kl_update(1.0, 0.0, 100, target=1.0, horizon=100))
    assert up == pytest.approx(1.2) and down == pytest.approx(0.8)
    assert float(pj.adaptive_kl_update(0.5, 1.0, 64, target=1.0, horizon=100)) == 0.5

  def test_controller_settles_on_target(self):
    """With KL ∝ 1/β (a stiffer penalty keeps the policy closer), β converges to KL's target."""
    beta = 0.01
    for _ in range(400):
      observed = 0.6 / beta
      beta = pj.adaptive_kl_update(beta, observed, 256, target=6.0, horizon=2048)
    assert float(0.6 / beta) == pytest.approx(6.0, rel=0.01)

  def test_per_sequence_kls_are_refused_and_a_sweep_vmaps(self):
    """An array of per-sequence KLs gave one β per sequence; vmap over a sweep still works."""
    with pytest.raises(ValueError, match=r"observed_kl must be a scalar .*got shape \[3\]"):
      pj.adaptive_kl_update(0.1, jnp.ones(3), 64, target=1.0, horizon=100)
    betas = jax.vmap(lambda b, kl: pj.adaptive_kl_update(b, kl, 64, target=1.0, horizon=100))(
      jnp.array([0.1, 0.2]), jnp.array([0.0, 1e9])
    )
    np.testing.assert_allclose(betas, [0.1 * (1 - 0.2 * 0.64), 0.2 * (1 + 0.2 * 0.64)], rtol=1e-6)

  def test_bad_hyperparameters(self):
    with pytest.raises(ValueError, match="target KL must be > 0"):
      pj.adaptive_kl_update(0.1, 1.0, 1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="horizon must be > 0"):
      pj.adaptive_kl_update(0.1, 1.0, 1, target=1.0, horizon=-1)
    # 1024 samples over a horizon of 100: a KL below target would multiply β by 1 − 2.048.
    with pytest.raises(ValueError, match=r"horizon 100 must exceed 0.2 × n_steps \(204.8\)"):
      pj.adaptive_kl_update(0.1, 0.5, 1024, target=6.0, horizon=100)
    with pytest.raises(ValueError, match=r"must exceed 0\.2 × n_steps \(100\)"):
      pj.adaptive_kl_update(0.1, 0.5, 500, target=6.0, horizon=100)  # 5: β → 0
    # NumPy and JAX scalars are checked as Python numbers are.
    with pytest.raises(ValueError, match=r"target KL must be > 0, got -1\.0"):
      pj.adaptive_kl_update(0.1, 1.0, 1, target=np.float32(-1), horizon=10)
    with pytest.raises(ValueError, match=r"must exceed 0\.2 × n_steps \(100\)"):
      pj.adaptive_kl_update(0.1, 0.5, jnp.asarray(500), target=6.0, horizon=np.int64(100))
    # Just inside the bound the coefficient shrinks as far as it can and stays positive.
    low = float(pj.adaptive_kl_update(0.1, 0.0, 499, target=6.0, horizon=100))
    assert low == pytest.approx(0.1 * (1 - 0.2 * 4.99), rel=1e-3) and low > 0  # float32: 1 − 0.998
