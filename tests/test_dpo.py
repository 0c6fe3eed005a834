"""DPO as a stage: sequence log-probabilities, the objective at the reference, and learning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ppo_jax import dpo
from ppo_jax.data import Sequences
from ppo_jax.models import CausalLM, ModelConfig

CFG = ModelConfig.gpt2(
  vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=16
)
B, P, R = 4, 3, 4


def _pairs():
  rng = np.random.default_rng(0)

  def seqs():
    ids = rng.integers(2, 16, (B, P + R)).astype(np.int32)
    resp = np.ones((B, R), np.float32)
    resp[1, 2:] = resp[3, 1:] = 0  # shorter responses: padding after them
    mask = np.concatenate([np.ones((B, P), np.int32), resp.astype(np.int32)], 1)
    return Sequences(ids, mask, resp)

  return seqs(), seqs()


def test_sequence_logprobs_sum_the_response_tokens():
  graphdef, state = nnx.split(CausalLM(CFG, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(state)
  s, _ = _pairs()
  got = np.asarray(dpo.sequence_logprobs(graphdef, params, s.ids, s.mask, s.response_mask))
  logits = np.asarray(nnx.merge(graphdef, state)(jnp.asarray(s.ids), jnp.asarray(s.mask)))
  logits = logits.astype(np.float64)[:, P - 1 : P + R - 1]  # positions predicting the response
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
  logp -= logits.max(-1, keepdims=True)
  tok = np.take_along_axis(logp, s.ids[:, P:, None], -1)[..., 0]
  np.testing.assert_allclose(got, (tok * s.response_mask).sum(-1), rtol=1e-5, atol=1e-5)
  # Padding after a short response changes nothing.
  garbage = s.ids.copy()
  garbage[1, P + 2 :] = 15
  again = dpo.sequence_logprobs(graphdef, params, garbage, s.mask, s.response_mask)
  assert float(again[1]) == float(got[1])


def test_objective_at_the_reference_is_log2_with_a_gradient():
  graphdef, state = nnx.split(CausalLM(CFG, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(state)
  chosen, rejected = _pairs()
  ref = tuple(dpo.reference_logprobs(graphdef, params, x, batch_size=3) for x in (chosen, rejected))
  assert ref[0].shape == (B,)  # the padded last batch is cut back
  batch = dpo.pair_batch((chosen, rejected), ref, np.arange(B))
  objective = jax.value_and_grad(dpo.dpo_objective, has_aux=True)
  (loss, metrics), grads = jax.jit(objective, static_argnums=1, static_argnames="beta")(
    params, graphdef, batch, beta=0.5
  )  # jitted: op by op, the backward pass alone took seconds
  np.testing.assert_allclose(float(loss), np.log(2.0), rtol=1e-5)  # h = 0 for every pair
  assert abs(float(metrics["reward_margin"])) < 1e-5
  assert float(optax_norm(grads)) > 0.0


def test_ipo_averages_each_responses_logprobs_over_its_tokens():
  """The stage's IPO takes the policy's and the reference's log-probabilities per response token
  (two of the four responses are shorter); DPO and hinge their sums. Against float64 NumPy."""
  import references as ref

  graphdef, state = nnx.split(CausalLM(CFG, rngs=nnx.Rngs(0)))
  policy = nnx.to_pure_dict(nnx.split(CausalLM(CFG, rngs=nnx.Rngs(1)))[1])
  chosen, rejected = _pairs()
  reference = nnx.to_pure_dict(state)
  refs = tuple(
    dpo.reference_logprobs(graphdef, reference, x, batch_size=4) for x in (chosen, rejected)
  )
  batch = dpo.pair_batch((chosen, rejected), refs, np.arange(B))
  logp = [
    np.asarray(dpo.sequence_logprobs(graphdef, policy, x.ids, x.mask, x.response_mask), np.float64)
    for x in (chosen, rejected)
  ]
  count = [x.response_mask.sum(-1).astype(np.float64) for x in (chosen, rejected)]
  assert count[0].min() < R  # shorter responses: the averaging has teeth
  for kind, beta in (("ipo", 0.5), ("hinge", 3.0), ("sigmoid", 0.5)):
    loss, m = dpo.dpo_objective(policy, graphdef, batch, beta=beta, loss=kind)
    # The metrics but the loss come from the sums whatever the loss: they compare across losses.
    beta_h = beta * ((logp[0] - refs[0]) - (logp[1] - refs[1]))
    assert float(m["reward_margin"]) == pytest.approx(beta_h.mean(), rel=1e-4), kind
    assert float(m["accuracy"]) == np.mean(beta_h > 0) and float(m["loss"]) == float(loss)
    if kind == "ipo":
      args = (logp[0] / count[0], logp[1] / count[1], refs[0] / count[0], refs[1] / count[1])
    else:
      args = (logp[0], logp[1], refs[0], refs[1])
    assert float(loss) == pytest.approx(ref.dpo(*args, beta, 0.0, kind), rel=1e-4), kind
    # RPO: α times the chosen responses' NLL per token, averaged over the pairs, on any loss.
    with_nll, m = dpo.dpo_objective(policy, graphdef, batch, beta=beta, loss=kind, rpo_alpha=0.7)
    nll = np.mean(-logp[0] / count[0])
    assert float(m["nll_chosen"]) == pytest.approx(nll, rel=1e-5)
    assert float(with_nll) == pytest.approx(float(loss) + 0.7 * nll, rel=1e-5)
    assert float(m["loss"]) == float(with_nll)


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_reference_logprobs_of_no_pairs_are_empty():
  """A held-out set of no pairs (``dpo.eval_fraction=0``, or a one-pair file) gives no
  log-probabilities rather than an error."""
  graphdef, state = nnx.split(CausalLM(CFG, rngs=nnx.Rngs(0)))
  chosen, _ = _pairs()
  none = chosen.take(np.arange(0))
  got = dpo.reference_logprobs(graphdef, nnx.to_pure_dict(state), none, batch_size=3)
  assert got.shape == (0,) and got.dtype == np.float32
