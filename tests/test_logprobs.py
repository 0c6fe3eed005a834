"""token_logprobs and entropy_from_logits against float64 loops; temperature; dtypes; jit."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references as ref

import ppo_jax as pj


def _logits(seed=0, shape=(3, 5, 11), scale=3.0):
  return np.random.default_rng(seed).normal(scale=scale, size=shape).astype(np.float32)


class TestTokenLogprobs:
  def test_hand_computed(self):
    logits = jnp.log(jnp.array([[[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]]]))
    got = pj.token_logprobs(logits, jnp.array([[2, 0]]))
    np.testing.assert_allclose(got, [[math.log(0.7), math.log(0.5)]], rtol=1e-6)

  @pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
  def test_reference_under_jit(self, temperature):
    logits = _logits()
    tokens = np.random.default_rng(1).integers(0, 11, size=(3, 5))
    f = jax.jit(pj.token_logprobs, static_argnames="temperature")
    got = f(logits, tokens, temperature=temperature)
    want = [
      [ref.log_softmax_at(logits[b, t], tokens[b, t], temperature) for t in range(5)]
      for b in range(3)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def test_traced_temperature(self):
    logits, tokens = _logits(), np.zeros((3, 5), np.int32)
    f = jax.jit(lambda t: pj.token_logprobs(logits, tokens, temperature=t))
    want = pj.token_logprobs(logits, tokens, temperature=0.7)
    np.testing.assert_allclose(f(0.7), want, rtol=1e-6)

  def test_bf16_logits_are_computed_in_float32(self):
    logits = _logits(scale=10.0)
    tokens = np.random.default_rng(2).integers(0, 11, size=(3, 5))
    got = pj.token_logprobs(jnp.asarray(logits, jnp.bfloat16), tokens)
    assert got.dtype == jnp.float32
    # The only error left is the bf16 rounding of the inputs themselves.
    rounded = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    want = [[ref.log_softmax_at(rounded[b, t], tokens[b, t]) for t in range(5)] for b in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def test_logprobs_normalise(self):
    logits = _logits()
    all_tokens = jnp.broadcast_to(jnp.arange(11), (3, 5, 11)).transpose(2, 0, 1)
    per_token = jax.vmap(lambda tok: pj.token_logprobs(logits, tok, temperature=0.7))(all_tokens)
    np.testing.assert_allclose(jnp.exp(per_token).sum(0), 1.0, rtol=1e-5)

  def test_shape_errors(self):
    with pytest.raises(ValueError, match=r"tokens shape \[3, 4\] does not match"):
      pj.token_logprobs(jnp.zeros((3, 5, 11)), jnp.zeros((3, 4), jnp.int32))
    with pytest.raises(ValueError, match="temperature must be > 0"):
      pj.token_logprobs(jnp.zeros((3, 5, 11)), jnp.zeros((3, 5), jnp.int32), temperature=0.0)

  def test_ids_outside_the_vocabulary_give_nan_under_jit(self):
    """Unchecked under jit: −1 must not wrap round to the last token's log-prob."""
    got = jax.jit(pj.token_logprobs)(jnp.zeros((1, 3, 4)), jnp.array([[-1, 4, 1]]))
    assert np.isnan(got[0, :2]).all() and float(got[0, 2]) == pytest.approx(-math.log(4))


class TestEntropy:
  def test_hand_computed(self):
    uniform = jnp.zeros((1, 1, 8))
    assert float(pj.entropy_from_logits(uniform)[0, 0]) == pytest.approx(math.log(8), rel=1e-6)
    peaked = jnp.array([[[0.0, -jnp.inf, -jnp.inf]]])
    assert float(pj.entropy_from_logits(peaked)[0, 0]) == 0.0

  @pytest.mark.parametrize("temperature", [1.0, 0.5])
  def test_reference_under_jit(self, temperature):
    logits = _logits(seed=3)
    got = jax.jit(pj.entropy_from_logits, static_argnames="temperature")(
      logits, temperature=temperature
    )
    want = [[ref.entropy(logits[b, t], temperature) for t in range(5)] for b in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def test_entropy_is_expected_negative_logprob(self):
    logits = _logits(seed=4, shape=(2, 3, 6))
    lp = jax.vmap(lambda tok: pj.token_logprobs(logits, tok))(
      jnp.broadcast_to(jnp.arange(6), (2, 3, 6)).transpose(2, 0, 1)
    )
    np.testing.assert_allclose(
      pj.entropy_from_logits(logits), -(jnp.exp(lp) * lp).sum(0), rtol=1e-5
    )

  @pytest.mark.parametrize("offset", [1e3, 1e5])
  def test_large_logits_lose_no_accuracy(self, offset):
    """Σ p·z summed near the logits' size would lose their ulp (8e-3 at 1e5) in the difference."""
    logits = (_logits(seed=5, shape=(2, 3, 7)) + offset).astype(np.float32)
    want = [[ref.entropy(logits[b, t].astype(np.float64), 1.0) for t in range(3)] for b in range(2)]
    np.testing.assert_allclose(pj.entropy_from_logits(logits), want, atol=1e-5)
