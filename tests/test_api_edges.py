"""The public functions at their edges, as a notebook meets them: traced hyperparameters (a
vmapped sweep), one sequence under vmap, empty batches, NumPy scalars, ids out of range,
right-padded prompts, filtered (−inf) logits. Each either gives the right value or one clear
error, never a silent nan or a wrong number."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references as ref
from flax import nnx

import ppo_jax as pj
from ppo_jax.hparams import PPOHparams


def test_entropy_gradient_is_finite_with_filtered_logits():
  """A −inf logit (a filtered vocabulary) has p = 0: its term and its gradient are 0, the others
  are the entropy's gradient over the remaining tokens (which a float64 central difference
  checks)."""
  z = jnp.array([[[0.0, 1.0, -jnp.inf]]])
  grad = jax.grad(lambda z: pj.entropy_from_logits(z).sum())(z)
  assert np.all(np.isfinite(grad)) and grad[0, 0, 2] == 0.0
  entropy = lambda a, b: -sum(p * np.log(p) for p in np.exp([a, b]) / np.exp([a, b]).sum())
  h = 1e-6
  want = [
    (entropy(h, 1.0) - entropy(-h, 1.0)) / (2 * h),
    (entropy(0, 1 + h) - entropy(0, 1 - h)) / (2 * h),
  ]
  np.testing.assert_allclose(grad[0, 0, :2], want, atol=1e-5)


def test_token_logprobs_refuses_ids_out_of_range_and_a_zero_temperature():
  logits = jnp.ones((1, 2, 4))
  for tokens in ([[7, 1]], [[-1, 1]]):  # nan, or (negative) another token's log-prob
    with pytest.raises(ValueError, match=r"tokens hold ids outside \[0, 4\)"):
      pj.token_logprobs(logits, jnp.array(tokens))
  with pytest.raises(ValueError, match="tokens must be integer ids, got dtype float32"):
    pj.token_logprobs(logits, jnp.array([[1.0, 2.0]]))
  with pytest.raises(ValueError, match=r"temperature must be > 0, got 0\.0"):
    pj.token_logprobs(logits, jnp.array([[1, 2]]), temperature=np.float32(0))
  traced = jax.jit(pj.token_logprobs)(logits, jnp.array([[1, 3]]))  # no check under jit
  np.testing.assert_allclose(traced, np.log(0.25), rtol=1e-6)
  # Ids a jitted function closes over are concrete: checked, and nothing staged for the check.
  good, bad = jnp.array([[1, 3]]), jnp.array([[1, 9]])
  np.testing.assert_array_equal(jax.jit(lambda: pj.token_logprobs(logits, good))(), traced)
  with pytest.raises(ValueError, match="tokens hold ids outside"):
    jax.jit(lambda: pj.token_logprobs(logits, bad))()
  # A temperature per row is an array: checked whole.
  tau = jnp.array([0.5, 2.0])[:, None, None]
  np.testing.assert_allclose(
    pj.token_logprobs(jnp.ones((2, 2, 4)), jnp.ones((2, 2), jnp.int32), temperature=tau),
    np.log(0.25),
    rtol=1e-6,
  )
  with pytest.raises(ValueError, match=r"temperature must be > 0, got an array from 0\.0 to 2\.0"):
    pj.token_logprobs(jnp.ones((2, 2, 4)), jnp.ones((2, 2), jnp.int32), temperature=tau * (tau > 1))


def test_loss_hyperparameters_can_be_swept_with_vmap():
  """``dual_clip``, ``clip_eps`` and DPO's ``label_smoothing`` traced: each lane equals the call
  with that value; negative clip ranges are refused when given as numbers."""
  rng = np.random.default_rng(0)
  lp, old, adv = (jnp.asarray(rng.normal(size=(3, 5)), jnp.float32) for _ in range(3))
  m = jnp.ones((3, 5))
  for name, values in (("dual_clip", [2.0, 3.0]), ("clip_eps", [0.1, 0.3])):
    swept = jax.vmap(lambda c, n=name: pj.policy_loss(lp, old, adv, m, **{n: c})[0])(
      jnp.array(values)
    )
    each = [pj.policy_loss(lp, old, adv, m, **{name: v})[0] for v in values]
    np.testing.assert_allclose(swept, each, rtol=1e-6)
  with pytest.raises(ValueError, match=r"clip_eps must be ≥ 0, got -0\.1"):
    pj.policy_loss(lp, old, adv, m, clip_eps=-0.1)
  with pytest.raises(ValueError, match="clip_eps must be ≥ 0"):
    pj.value_loss(lp, old, adv, m, clip_eps=-0.1)
  pairs = [jnp.asarray(rng.normal(size=4), jnp.float32) for _ in range(4)]
  swept = jax.vmap(lambda e: pj.dpo_loss(*pairs, label_smoothing=e)[0])(jnp.array([0.0, 0.2]))
  each = [pj.dpo_loss(*pairs, label_smoothing=e)[0] for e in (0.0, 0.2)]
  np.testing.assert_allclose(swept, each, rtol=1e-6)


def test_gae_takes_one_sequence_and_vmaps_over_rows():
  rng = np.random.default_rng(1)
  r, v = rng.normal(size=(2, 3, 6))
  m = np.ones((3, 6))
  m[1, 4:] = 0
  adv, ret = pj.gae(r, v, m, gamma=0.99, lam=0.9)
  rows = jax.vmap(lambda r, v, m: pj.gae(r, v, m, gamma=0.99, lam=0.9))(r, v, m)
  np.testing.assert_allclose(rows[0], adv, rtol=1e-6)
  np.testing.assert_allclose(rows[1], ret, rtol=1e-6)
  want = ref.gae(r[1:2], v[1:2], m[1:2], 0.99, 0.9)[0][0]  # float64 loop, one row
  np.testing.assert_allclose(pj.gae(r[1], v[1], m[1], gamma=0.99, lam=0.9)[0], want, atol=1e-6)


def test_losses_name_their_arrays_when_not_BxT():
  """One sequence ([T]) is vmapped by the caller: the losses say so, naming the arrays (they
  reduce over the batch, so a silent [T] → [1, T] would change what a mean means)."""
  x, m = jnp.zeros(5), jnp.ones(5)
  with pytest.raises(
    ValueError,
    match=r"expected logp, old_logp, advantages, mask of shape \[B, T\] \(jax\.vmap.*got logp\[5\]",
  ):
    pj.policy_loss(x, x, x, m)
  with pytest.raises(
    ValueError, match=r"values, old_values, returns, mask of shape \[B, T\].*got values\[5\]"
  ):
    pj.value_loss(x, x, x, m)
  loss, _ = jax.vmap(pj.policy_loss)(*[jnp.zeros((3, 2, 5))] * 3, jnp.ones((3, 2, 5)))
  assert loss.shape == (3,)
  # Per-response advantages ([B], group_advantages') beside [B, T] arrays: how to broadcast.
  lp, adv = jnp.zeros((2, 5)), pj.group_advantages(jnp.array([1.0, 2.0]), 2)
  with pytest.raises(
    ValueError,
    match=r"got logp\[2, 5\], old_logp\[2, 5\], advantages\[2\], mask\[2, 5\] \(advantages holds "
    r"one value per sequence, as group_advantages gives: .*broadcast_to\(advantages\[:, None\]",
  ):
    pj.policy_loss(lp, lp, adv, jnp.ones((2, 5)))
  pj.policy_loss(lp, lp, jnp.broadcast_to(adv[:, None], lp.shape), jnp.ones((2, 5)))  # as said


def test_empty_batches():
  """No tokens: the policy loss and its metrics are 0 (as for an all-masked batch). No pairs: an
  error, since a mean over nothing is nan."""
  empty = jnp.zeros((2, 0))
  loss, metrics = pj.policy_loss(empty, empty, empty, empty)
  assert float(loss) == 0.0 and all(float(x) == 0.0 for x in metrics.values())
  with pytest.raises(ValueError, match="chosen_scores_B is empty: expected at least one pair"):
    pj.bradley_terry_loss(jnp.zeros(0), jnp.zeros(0))
  with pytest.raises(ValueError, match="is empty"):
    pj.dpo_loss(*[jnp.zeros(0)] * 4)


def test_numpy_scalars_and_lists_are_taken():
  np.testing.assert_allclose(
    pj.group_advantages(jnp.arange(4.0), np.int64(2)), pj.group_advantages(jnp.arange(4.0), 2)
  )
  with pytest.raises(ValueError, match=r"group_size must be an int ≥ 2, got 2\.0"):
    pj.group_advantages(jnp.arange(4.0), 2.0)
  assert float(pj.masked_mean([[1.0, 2.0, 9.0]], [[1, 1, 0]])) == 1.5
  assert float(pj.masked_mean([1.0, 3.0], [1.0, 0.5])) == 2.0  # a mask selects: 0.5 counts as 1
  with pytest.raises(ValueError, match="top_p: must be in"):
    PPOHparams(top_p=0.0)


@pytest.fixture(scope="module")
def gpt2():
  cfg = pj.models.ModelConfig.gpt2(
    num_layers=1, hidden_size=32, num_heads=2, vocab_size=64, max_position_embeddings=32
  )
  return pj.models.CausalLM(cfg, rngs=nnx.Rngs(0))


def test_generate_refuses_what_it_would_get_wrong(gpt2):
  key = jax.random.key(0)
  cases = [
    (([[7, 8, 9, 0, 0]], [[1, 1, 1, 0, 0]]), {}, "row 0 has padding after a real token"),
    (([[7.5, 8, 9]], None), {}, "input_ids must be integer token ids, got dtype float32"),
    (([[7, 8, 9]], None), {"pad_token_id": 64}, r"pad_token_id 64 is outside .*\[0, 64\)"),
  ]
  for (ids, mask), kw, message in cases:
    with pytest.raises(ValueError, match=message):
      pj.generate(gpt2, ids, mask, key=key, max_new_tokens=3, **kw)
  # Left padding is what it takes; a NumPy int is a stop token like a Python one: the first
  # token sampled without a stop token, made the stop token, ends the response there.
  gen = lambda **kw: pj.generate(gpt2, [[0, 8, 9]], [[0, 1, 1]], key=key, max_new_tokens=3, **kw)
  stop = int(gen().tokens[0, 0])
  for eos in (stop, np.int64(stop)):
    out = gen(eos_token_id=eos)
    assert int(out.tokens[0, 0]) == stop and int(out.lengths[0]) == 1, type(eos)


def test_a_jitted_function_may_close_over_concrete_ids(gpt2):
  """The eager id check reads closed-over ids with NumPy: ``jax.jit(lambda: model(ids))`` and
  ``nnx.jit`` work as before the check existed, and give the eager logits."""
  ids = jnp.array([[1, 2, 3, 4]])
  eager = gpt2(ids, None)
  np.testing.assert_allclose(jax.jit(lambda: gpt2(ids, None))(), eager, atol=1e-6)
  loss = nnx.jit(lambda m: m(ids, None).mean())(gpt2)
  np.testing.assert_allclose(loss, eager.mean(), atol=1e-6)
  with pytest.raises(ValueError, match="dtype None"):
    pj.models.ModelConfig.gpt2(dtype=None)


def test_a_full_forward_refuses_what_would_be_nan(gpt2):
  with pytest.raises(ValueError, match="40 tokens exceed the model's 32 learned positions"):
    gpt2(jnp.ones((1, 40), jnp.int32), None)
  with pytest.raises(
    ValueError, match=r"input ids outside the vocabulary \[0, 64\) \(min 3, max 70\)"
  ):
    gpt2(jnp.array([[3, 70]]), None)
  assert np.all(np.isfinite(jax.jit(lambda i: gpt2(i, None))(jnp.ones((1, 32), jnp.int32))))


def test_a_full_forward_refuses_a_mask_of_another_shape(gpt2):
  """A ``[B, 1]`` or ``[1, T]`` mask broadcast silently (every token at position 0: other
  logits); a ``[T]`` one or 1-D ids raised an IndexError, ``[B, T − 1]`` a TypeError deep down."""
  ids = jnp.ones((3, 9), jnp.int32)
  for mask in (jnp.ones((3, 1)), jnp.ones((1, 9)), jnp.ones((9,)), jnp.ones((3, 8))):
    with pytest.raises(
      ValueError, match=r"attention_mask shape \[.*\] does not match input_ids \[3, 9\]"
    ):
      gpt2(ids, mask)
  with pytest.raises(ValueError, match=r"expected input_ids \[B, T\], got shape \[9\]"):
    gpt2(jnp.ones((9,), jnp.int32), None)


def test_a_hyperparameter_without_an_off_refuses_none():
  """``value_loss(clip_eps=None)`` is the unclipped loss; None where nothing means off was a
  TypeError from inside the arithmetic."""
  x, m = jnp.zeros((1, 2)), jnp.ones((1, 2))
  cases = [
    (lambda: pj.policy_loss(x, x, x, m, clip_eps=None), "clip_eps must be ≥ 0, got None"),
    (lambda: pj.gae(x, x, m, gamma=1.0, lam=None), r"lam must be in \[0, 1\], got None"),
    (lambda: pj.token_logprobs(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), int), temperature=None),
     "temperature must be > 0, got None"),
  ]  # fmt: skip
  for call, message in cases:
    with pytest.raises(ValueError, match=message):
      call()
  assert np.isfinite(float(pj.value_loss(x, x, x, m, clip_eps=None)[0]))


def test_a_preset_config_takes_any_of_its_defaults_as_a_keyword():
  """``ModelConfig.gpt2(intermediate_size=…)`` raised "got multiple values": a preset's defaults
  (GPT-2's n_inner and layer-norm ε, Llama's head_dim) are keywords like the others."""
  from ppo_jax.models import ModelConfig

  small = dict(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2)
  gpt2 = ModelConfig.gpt2(**small, intermediate_size=48, norm_eps=1e-3)
  assert gpt2 == ModelConfig.gpt2(**small).replace(intermediate_size=48, norm_eps=1e-3)
  assert (gpt2.head_dim, gpt2.activation, gpt2.tie_word_embeddings) == (4, "gelu_tanh", True)
  llama = ModelConfig.llama(**small, head_dim=8, norm_eps=1e-6)
  assert llama == ModelConfig.llama(**small).replace(head_dim=8, norm_eps=1e-6)
  # What GPT-2's tensors cannot hold (a c_attn of fewer k/v heads, a projection without bias)
  # is refused when the config is made, not by a KeyError or an unloadable file at save.
  for bad, why in (
    (dict(num_kv_heads=1), "gpt2 has as many k/v heads as heads, not 1"),
    (dict(qkv_bias=False), "gpt2's projections all have biases"),
    (dict(mlp_bias=False), "gpt2's projections all have biases"),
  ):
    with pytest.raises(ValueError, match=f"^unsupported model config: {why}"):
      ModelConfig.gpt2(**small, **bad)
