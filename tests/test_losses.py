"""policy_loss and value_loss: references, clip gradients, masks, micro-batch recombination."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references as ref
from cases import B, T, with_garbage

import ppo_jax as pj
from ppo_jax import masking

policy_jit = jax.jit(
  pj.policy_loss, static_argnames=("clip_eps", "clip_eps_high", "dual_clip", "agg")
)
value_jit = jax.jit(pj.value_loss, static_argnames=("clip_eps", "agg"))


def _policy_inputs(seed=0, shape=(B, T), spread=0.4):
  rng = np.random.default_rng(seed)
  old = rng.normal(loc=-2.0, size=shape)
  logp = old + rng.normal(scale=spread, size=shape)  # ratios from ~0.3 to ~3
  adv = rng.normal(size=shape)
  return logp, old, adv


class TestPolicyLoss:
  @pytest.mark.parametrize("agg", masking.AGG_MODES)
  @pytest.mark.parametrize(
    "clip", [dict(), dict(clip_eps=0.1, clip_eps_high=0.28), dict(dual_clip=3.0)], ids=str
  )
  def test_reference_and_garbage(self, mask, agg, clip):
    logp, old, adv = _policy_inputs()
    loss, metrics = policy_jit(
      with_garbage(logp, mask, 1),
      with_garbage(old, mask, 2),
      with_garbage(adv, mask, 3),
      mask,
      agg=agg,
      **clip,
    )
    want, want_metrics = ref.policy_loss(logp, old, adv, mask, agg=agg, **clip)
    assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert float(metrics["clipfrac"]) == pytest.approx(want_metrics["clipfrac"], abs=1e-6)
    assert float(metrics["approx_kl"]) == pytest.approx(
      want_metrics["approx_kl"], rel=1e-4, abs=1e-6
    )
    assert float(metrics["num_tokens"]) == mask.sum()
    assert float(metrics["num_seqs"]) == (mask.sum(-1) > 0).sum()

  def test_hand_computed(self):
    # Token 0: Â = 1, r = 1.5 > 1.2 → clipped: −1.2.  Token 1: Â = −2, r = 0.5 < 0.8 → clipped: 1.6.
    # Token 2: Â = 1, r = 0.5 → unclipped (pessimistic): −0.5.  Token 3: Â = −1, r = 1 → 1.
    logp = jnp.log(jnp.array([[1.5, 0.5, 0.5, 1.0]]))
    adv = jnp.array([[1.0, -2.0, 1.0, -1.0]])
    loss, m = pj.policy_loss(logp, jnp.zeros((1, 4)), adv, jnp.ones((1, 4)))
    assert float(loss) == pytest.approx((-1.2 + 1.6 - 0.5 + 1.0) / 4)
    assert float(m["clipfrac"]) == 0.5

  def test_dual_clip_hand_computed(self):
    # Â = −1, r = 5: the clip gives max(5, 1.2) = 5; the dual clip caps it at c = 3.
    logp = jnp.log(jnp.array([[5.0, 5.0]]))
    adv = jnp.array([[-1.0, 1.0]])
    loss, m = pj.policy_loss(logp, jnp.zeros((1, 2)), adv, jnp.ones((1, 2)), dual_clip=3.0)
    assert float(loss) == pytest.approx((3.0 - 1.2) / 2)
    assert float(m["dual_clipfrac"]) == 0.5

  def test_ratio_one(self, mask):
    """ratio == 1: loss = −mean(Â), clipfrac 0, approx_kl 0 (the first minibatch of PPO)."""
    _, old, adv = _policy_inputs(seed=4)
    loss, m = policy_jit(old, old, adv, mask)
    assert float(loss) == pytest.approx(-ref.masked_mean(adv, mask), abs=1e-6)
    assert float(m["clipfrac"]) == 0.0 and float(m["approx_kl"]) == 0.0
    assert float(m["ratio"]) == (1.0 if mask.any() else 0.0)

  @pytest.mark.parametrize(
    "adv,ratio,clip_binds",
    [
      (1.0, 1.5, True),  # Â > 0 above the band: objective flat
      (-1.0, 0.5, True),  # Â < 0 below the band: objective flat
      (1.0, 0.5, False),  # Â > 0 below the band: pessimistic side keeps the gradient
      (-1.0, 1.5, False),  # Â < 0 above the band: pessimistic side keeps the gradient
      (1.0, 1.1, False),  # inside the band
      (-1.0, 0.9, False),
    ],
  )
  def test_clip_gradients(self, adv, ratio, clip_binds):
    old = jnp.array([[-1.0, -2.0]])
    logp = old + jnp.log(jnp.array([[ratio, 1.0]]))
    mask = jnp.array([[1.0, 0.0]])
    grad = jax.grad(lambda lp: pj.policy_loss(lp, old, jnp.full((1, 2), adv), mask)[0])(logp)
    # ∂(−Â·r)/∂logp = −Â·r where the unclipped term is the max; 0 where the clip binds.
    want = 0.0 if clip_binds else -adv * ratio
    np.testing.assert_allclose(grad, [[want, 0.0]], rtol=1e-6, atol=1e-7)

  def test_dual_clip_gradient_is_zero_when_capped(self):
    logp = jnp.log(jnp.array([[5.0]]))
    grad = jax.grad(
      lambda lp: pj.policy_loss(
        lp, jnp.zeros((1, 1)), -jnp.ones((1, 1)), jnp.ones((1, 1)), dual_clip=3.0
      )[0]
    )(logp)
    assert float(grad[0, 0]) == 0.0

  def test_gradient_matches_reference_finite_differences(self):
    logp, old, adv = _policy_inputs(seed=5, shape=(2, 5))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float64)
    grad = jax.grad(lambda lp: pj.policy_loss(lp, old, adv, mask, agg="seq-mean-token-mean")[0])(
      jnp.asarray(logp, jnp.float32)
    )
    h = 1e-6
    for b, t in [(0, 0), (0, 2), (1, 4), (0, 4)]:
      up, down = logp.copy(), logp.copy()
      up[b, t] += h
      down[b, t] -= h
      fd = (
        ref.policy_loss(up, old, adv, mask, agg="seq-mean-token-mean")[0]
        - ref.policy_loss(down, old, adv, mask, agg="seq-mean-token-mean")[0]
      ) / (2 * h)
      assert float(grad[b, t]) == pytest.approx(fd, rel=1e-3, abs=1e-6)

  @pytest.mark.parametrize("agg", masking.AGG_MODES)
  def test_all_masked_batch_has_zero_loss_and_finite_gradients(self, agg):
    shape = (3, 5)
    m = jnp.zeros(shape)
    junk = jnp.full(shape, 1e3)
    loss, metrics = pj.policy_loss(junk, -junk, junk, m, agg=agg, dual_clip=3.0)
    assert float(loss) == 0.0
    assert all(bool(jnp.isfinite(v)) for v in metrics.values())
    grad = jax.grad(lambda lp: pj.policy_loss(lp, -junk, junk, m, agg=agg)[0])(junk)
    np.testing.assert_array_equal(grad, 0.0)

  @pytest.mark.parametrize("adv", [1.0, 0.0, -1.0])
  def test_overflowing_ratio_gives_finite_loss_and_gradient(self, adv):
    """A real token with log-ratio 89 (exp overflows float32) or an old log-prob of −inf: the
    log-ratio is held to ±20, so that token adds a finite loss and no gradient (the other tokens
    keep theirs), for every sign of Â (Â = 0: a GRPO group of equal rewards)."""
    old = jnp.array([[0.0, -jnp.inf, 0.0]])
    logp = jnp.array([[89.0, -1.0, 0.0]])
    a = jnp.array([[adv, adv, 1.0]])
    for kw in (dict(), dict(dual_clip=3.0)):
      f = lambda lp, kw=kw: pj.policy_loss(lp, old, a, jnp.ones((1, 3)), **kw)
      (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(logp)
      assert bool(jnp.isfinite(loss)) and all(bool(jnp.isfinite(v)) for v in metrics.values())
      np.testing.assert_array_equal(grad[0, :2], 0.0)
      assert float(grad[0, 2]) == pytest.approx(-1 / 3)  # −Â·r/N at r = 1
    assert float(metrics["ratio_max"]) == pytest.approx(np.exp(pj.losses.LOG_RATIO_MAX), rel=1e-6)
    assert float(metrics["ratio_clamped"]) == pytest.approx(2 / 3)

  def test_advantages_and_old_logp_get_no_gradient(self):
    logp, old, adv = _policy_inputs(seed=6, shape=(2, 3))
    f = lambda o, a: pj.policy_loss(logp, o, a, np.ones((2, 3)))[0]
    g_old, g_adv = jax.grad(f, argnums=(0, 1))(jnp.asarray(old), jnp.asarray(adv))
    np.testing.assert_array_equal(g_old, 0.0)
    np.testing.assert_array_equal(g_adv, 0.0)

  def test_bad_dual_clip(self):
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
      pj.policy_loss(
        jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.ones((1, 1)), dual_clip=0.5
      )


class TestValueLoss:
  @pytest.mark.parametrize("agg", masking.AGG_MODES)
  @pytest.mark.parametrize("clip_eps", [0.2, None])
  def test_reference_and_garbage(self, mask, agg, clip_eps):
    rng = np.random.default_rng(7)
    values, returns = rng.normal(size=(2, B, T))
    old = values + rng.normal(scale=0.3, size=(B, T))
    loss, metrics = value_jit(
      with_garbage(values, mask, 1),
      with_garbage(old, mask, 2),
      with_garbage(returns, mask, 3),
      mask,
      clip_eps=clip_eps,
      agg=agg,
    )
    want, want_metrics = ref.value_loss(values, old, returns, mask, clip_eps, agg)
    assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert float(metrics["clipfrac"]) == pytest.approx(want_metrics["clipfrac"], abs=1e-6)

  @pytest.mark.parametrize(
    "v,v_old,ret,want_grad",
    [
      (2.0, 0.0, 3.0, 0.0),  # clipped V = 0.2 is farther from R: the clipped term binds, flat
      (2.0, 0.0, -1.0, 3.0),  # clip moves V towards R: unclipped binds, ∂ = V − R
      (0.1, 0.0, 1.0, -0.9),  # inside the clip range
    ],
  )
  def test_hand_computed_gradients(self, v, v_old, ret, want_grad):
    f = lambda v: pj.value_loss(
      v, jnp.full((1, 1), v_old), jnp.full((1, 1), ret), jnp.ones((1, 1))
    )[0]
    assert float(jax.grad(f)(jnp.full((1, 1), v))[0, 0]) == pytest.approx(want_grad, rel=1e-6)

  def test_all_masked(self):
    junk = jnp.full((2, 3), 1e3)
    loss, _ = pj.value_loss(junk, -junk, junk, jnp.zeros((2, 3)))
    grad = jax.grad(lambda v: pj.value_loss(v, -junk, junk, jnp.zeros((2, 3)))[0])(junk)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("agg", masking.AGG_MODES)
@pytest.mark.parametrize("split", [1, 2, 3])
def test_micro_batches_recombine_exactly(agg, split):
  """Loss and gradient over rows [:split] and [split:], weighted by the returned counts, equal
  the full batch's (the rule the train step's gradient accumulation relies on)."""
  mask = np.array(
    [[1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]],
    np.float32,
  )
  logp, old, adv = (jnp.asarray(x, jnp.float32) for x in _policy_inputs(seed=8))
  key = masking.agg_weight_key(agg)

  def loss_and_grad(sl):
    f = lambda lp: pj.policy_loss(lp, old[sl], adv[sl], mask[sl], agg=agg)
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(logp[sl])
    return loss, metrics[key], grad

  full_loss, _, full_grad = loss_and_grad(slice(None))
  parts = [loss_and_grad(slice(0, split)), loss_and_grad(slice(split, None))]
  total = sum(w for _, w, _ in parts)
  loss = sum(part_loss * w for part_loss, w, _ in parts) / total
  grad = jnp.concatenate([g * w for _, w, g in parts]) / total
  assert float(loss) == pytest.approx(float(full_loss), rel=1e-6)
  np.testing.assert_allclose(grad, full_grad, rtol=1e-5, atol=1e-8)
