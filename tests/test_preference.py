"""bradley_terry_loss and dpo_loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references as ref

import ppo_jax as pj


class TestBradleyTerry:
  def test_hand_computed(self):
    loss, m = pj.bradley_terry_loss(jnp.array([2.0, 0.0, 1.0]), jnp.array([0.0, 0.0, 3.0]))
    want = (math.log1p(math.exp(-2)) + math.log(2) + math.log1p(math.exp(2))) / 3
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(m["accuracy"]) == pytest.approx(1 / 3)  # a tie is not a correct ranking
    assert float(m["margin"]) == pytest.approx(0.0)
    assert float(m["num_pairs"]) == 3.0

  def test_centering_term_by_hand(self):
    """c·mean((s_c + s_r)²) on top of the likelihood, which a shift of every score leaves be; its
    gradient 2c(s_c + s_r)/B pulls both scores of a pair towards 0 together."""
    chosen, rejected = jnp.array([2.0, 0.0, 1.0]), jnp.array([0.0, 0.0, 3.0])
    nll = (math.log1p(math.exp(-2)) + math.log(2) + math.log1p(math.exp(2))) / 3
    loss, m = pj.bradley_terry_loss(chosen, rejected, center_coef=0.1)
    assert float(loss) == pytest.approx(nll + 0.1 * (4 + 0 + 16) / 3, rel=1e-6)
    assert float(m["nll"]) == pytest.approx(nll, rel=1e-6)
    assert float(m["center"]) == pytest.approx(20 / 3, rel=1e-6)
    shifted, _ = pj.bradley_terry_loss(chosen + 5, rejected + 5)
    assert float(shifted) == pytest.approx(nll, rel=1e-6)
    grad = jax.grad(lambda c: pj.bradley_terry_loss(c, rejected, center_coef=0.1)[0])(chosen)
    bt = -jax.nn.sigmoid(-(chosen - rejected)) / 3
    np.testing.assert_allclose(grad, bt + 2 * 0.1 * (chosen + rejected) / 3, rtol=1e-6)
    with pytest.raises(ValueError, match=r"^center_coef must be ≥ 0, got -1"):
      pj.bradley_terry_loss(chosen, rejected, center_coef=-1.0)

  def test_margins_against_the_reference_under_jit(self):
    """Llama 2's margin m: −log σ(s_c − s_r − m), the accuracy and margin metrics unchanged."""
    rng = np.random.default_rng(3)
    chosen, rejected, margins = rng.normal(scale=2.0, size=(3, 32))
    loss, m = jax.jit(pj.bradley_terry_loss)(chosen, rejected, margins)
    want_loss, want_acc = ref.bradley_terry(chosen, rejected, margins)
    assert float(loss) == pytest.approx(want_loss, rel=1e-5)
    assert float(loss) != pytest.approx(ref.bradley_terry(chosen, rejected)[0], rel=1e-3)
    assert float(m["accuracy"]) == pytest.approx(want_acc)
    assert float(m["margin"]) == pytest.approx(np.mean(chosen - rejected), rel=1e-5)
    with pytest.raises(ValueError, match=r"chosen_scores_B\[32\], margin_B\[3\]"):
      pj.bradley_terry_loss(chosen, rejected, margins[:3])

  def test_reference_under_jit(self):
    rng = np.random.default_rng(0)
    chosen, rejected = rng.normal(scale=5.0, size=(2, 32))
    loss, m = jax.jit(pj.bradley_terry_loss)(chosen, rejected)
    want_loss, want_acc = ref.bradley_terry(chosen, rejected)
    assert float(loss) == pytest.approx(want_loss, rel=1e-5)
    assert float(m["accuracy"]) == pytest.approx(want_acc)

  def test_gradient_is_minus_sigmoid_of_minus_margin(self):
    chosen, rejected = jnp.array([0.5, -1.0]), jnp.array([0.0, 2.0])
    g_c, g_r = jax.grad(lambda c, r: pj.bradley_terry_loss(c, r)[0], argnums=(0, 1))(
      chosen, rejected
    )
    want = -jax.nn.sigmoid(-(chosen - rejected)) / 2
    np.testing.assert_allclose(g_c, want, rtol=1e-6)
    np.testing.assert_allclose(g_r, -want, rtol=1e-6)

  def test_large_margins_are_stable(self):
    loss, _ = pj.bradley_terry_loss(jnp.array([1e4, -1e4]), jnp.array([-1e4, 1e4]))
    assert float(loss) == pytest.approx(1e4, rel=1e-6)  # (0 + 2e4) / 2

  def test_shape_errors(self):
    with pytest.raises(ValueError, match=r"chosen_scores_B\[3\], rejected_scores_B\[2\]"):
      pj.bradley_terry_loss(jnp.ones(3), jnp.ones(2))
    with pytest.raises(ValueError, match=r"expected chosen_scores_B of shape \[B\]"):
      pj.bradley_terry_loss(jnp.ones((3, 1)), jnp.ones((3, 1)))


class TestDpo:
  @pytest.mark.parametrize("beta,label_smoothing", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
  def test_reference_under_jit(self, beta, label_smoothing):
    rng = np.random.default_rng(1)
    logps = rng.normal(loc=-30.0, scale=5.0, size=(4, 16))
    f = jax.jit(pj.dpo_loss, static_argnames=("beta", "label_smoothing"))
    loss, m = f(*logps, beta=beta, label_smoothing=label_smoothing)
    assert float(loss) == pytest.approx(ref.dpo(*logps, beta, label_smoothing), rel=1e-5)
    h = beta * ((logps[0] - logps[2]) - (logps[1] - logps[3]))
    assert float(m["accuracy"]) == pytest.approx(np.mean(h > 0))
    assert float(m["reward_margin"]) == pytest.approx(np.mean(h), rel=1e-4, abs=1e-5)
    # The implicit rewards β·(log π − log π_ref) of each side (Rafailov et al. 2023, § 5).
    reward_c, reward_r = beta * (logps[0] - logps[2]), beta * (logps[1] - logps[3])
    assert float(m["reward_chosen"]) == pytest.approx(np.mean(reward_c), rel=1e-4, abs=1e-5)
    assert float(m["reward_rejected"]) == pytest.approx(np.mean(reward_r), rel=1e-4, abs=1e-5)

  @pytest.mark.parametrize("kind", ["ipo", "hinge"])
  @pytest.mark.parametrize("beta", [0.1, 2.0])
  def test_ipo_and_hinge_against_the_reference_under_jit(self, kind, beta):
    rng = np.random.default_rng(2)
    logps = rng.normal(loc=-9.0, scale=5.0, size=(4, 32))  # hinge: some pairs past the margin
    f = jax.jit(pj.dpo_loss, static_argnames=("beta", "kind"))
    loss, m = f(*logps, beta=beta, kind=kind)
    assert float(loss) == pytest.approx(ref.dpo(*logps, beta, 0.0, kind), rel=1e-5)
    h = beta * ((logps[0] - logps[2]) - (logps[1] - logps[3]))
    assert float(m["reward_margin"]) == pytest.approx(np.mean(h), rel=1e-4, abs=1e-5)
    if kind == "hinge":
      assert 0 < np.mean(h > 1) < 1  # both sides of the hinge's corner: the test has teeth

  def test_ipo_and_hinge_by_hand(self):
    """IPO at h = 0: (1/(2β))²; its gradient vanishes at h = 1/(2β). Hinge: 1 − βh below the
    margin, 0 past it."""
    zero = [jnp.array([-1.0])] * 4
    assert float(pj.dpo_loss(*zero, beta=0.25, kind="ipo")[0]) == pytest.approx(4.0)
    target = [jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-1.0]), jnp.array([-1.0])]
    grad = jax.grad(lambda a: pj.dpo_loss(a, *target[1:], beta=0.25, kind="ipo")[0])(target[0])
    assert float(pj.dpo_loss(*target, beta=0.25, kind="ipo")[0]) == 0.0 and float(grad[0]) == 0
    assert float(pj.dpo_loss(*target, beta=0.25, kind="hinge")[0]) == pytest.approx(0.5)
    assert float(pj.dpo_loss(*target, beta=1.0, kind="hinge")[0]) == 0.0

  def test_unknown_kind_and_smoothing_outside_dpo(self):
    with pytest.raises(ValueError, match=r"^kind: unknown 'kto'; expected one of sigmoid, ipo"):
      pj.dpo_loss(*[jnp.zeros(2)] * 4, kind="kto")
    with pytest.raises(ValueError, match=r"^label_smoothing must be 0 with kind='ipo', got 0\.1"):
      pj.dpo_loss(*[jnp.zeros(2)] * 4, kind="ipo", label_smoothing=0.1)

  def test_policy_equal_to_reference_gives_log_two(self):
    lp = jnp.array([-10.0, -3.0])
    loss, m = pj.dpo_loss(lp, lp + 1, lp, lp + 1, beta=0.3, label_smoothing=0.1)
    assert float(loss) == pytest.approx(math.log(2.0), rel=1e-6)
    assert float(m["reward_chosen"]) == 0.0 and float(m["accuracy"]) == 0.0

  def test_reference_gets_no_gradient(self):
    args = [
      jnp.array([-1.0, -2.0]),
      jnp.array([-3.0, -1.0]),
      jnp.array([-1.5, -2.0]),
      jnp.array([-2.0, -2.0]),
    ]
    grads = jax.grad(lambda *a: pj.dpo_loss(*a, beta=0.5)[0], argnums=(0, 1, 2, 3))(*args)
    assert float(jnp.abs(grads[0]).sum()) > 0 and float(jnp.abs(grads[1]).sum()) > 0
    np.testing.assert_array_equal(grads[2], 0.0)
    np.testing.assert_array_equal(grads[3], 0.0)

  def test_bad_label_smoothing(self):
    with pytest.raises(ValueError, match="label_smoothing must be in"):
      pj.dpo_loss(*[jnp.zeros(2)] * 4, label_smoothing=0.5)

  @pytest.mark.parametrize("beta", [0.0, -1.0])
  def test_bad_beta(self, beta):
    """β ≤ 0 would flatten or reverse the objective (prefer the rejected response)."""
    with pytest.raises(ValueError, match=f"beta must be > 0, got {beta}"):
      pj.dpo_loss(*[jnp.zeros(2)] * 4, beta=beta)
