"""PPO's hyperparameter numbers as inputs of the compiled programs (``PPOHparams.numbers``,
``structure``, ``Frozen.hparams``): the same results as numbers compiled in, and one program for
a sweep over them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ppo_jax import ppo, rollout
from ppo_jax.actor_critic import ActorCritic
from ppo_jax.hparams import NUMBERS, PPOHparams, ProgramInput
from ppo_jax.models import CausalLM, ModelConfig, RewardModel, ValueModel

CFG = ModelConfig.gpt2(
  vocab_size=24, hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=24
)
B, P, N, EOS = 8, 5, 6, 1
# Every number set away from its default (and every option that has a number on), so a number
# the program ignored, or read from the wrong field, changes a result below.
HP = PPOHparams(
  max_new_tokens=N,
  eos_token_id=EOS,
  num_epochs=2,
  num_minibatches=2,
  temperature=0.8,
  clip_eps=0.1,
  clip_eps_high=0.15,
  dual_clip=2.0,
  vf_clip=0.3,
  vf_coef=0.5,
  entropy_coef=0.01,
  early_stop_kl=5.0,
  gamma=0.9,
  lam=0.8,
  missing_eos_penalty=1.0,
  kl_adaptive=True,
  kl_target=0.01,
  kl_horizon=50.0,
)
PROMPTS = jnp.asarray(np.random.default_rng(0).integers(2, 24, (B, P)), jnp.int32)
PROMPT_MASK = jnp.ones((B, P), jnp.int32).at[1, :2].set(0)


def build(hp):
  """A state, its Frozen and the jitted steps; SGD, so that the updates are linear in the
  gradients (Adam's first step is lr·sign(g): one-ulp gradients near 0 would flip it)."""
  policy = CausalLM(CFG, rngs=nnx.Rngs(0))
  models, params, ref_params, reward_params = ActorCritic.build(
    policy, ValueModel(CFG, rngs=nnx.Rngs(1)), RewardModel(CFG, rngs=nnx.Rngs(2))
  )
  tx = optax.sgd(0.05)
  state = ppo.init_state(params, tx, hp, seed=0)
  return state, ppo.Frozen(ref_params, reward_params), rollout.make_step_fns(models, tx, hp)


def iteration(fns, state, frozen):
  key = ppo.iteration_keys(state)[0]
  gen = fns.sample(state.params["policy"], frozen, key, PROMPTS, PROMPT_MASK)
  exp, state, roll = fns.score(state, frozen, PROMPTS, PROMPT_MASK, gen, None)
  state, upd = fns.update(state, frozen, exp, roll["objective/kl"])
  scores, kl = fns.evaluate(state.params["policy"], frozen, exp.ids, exp.mask)
  return state, {**roll, **upd, "eval/scores": scores, "eval/kl": kl}, gen


def assert_same_run(a, b):
  (state_a, metrics_a, gen_a), (state_b, metrics_b, gen_b) = a, b
  np.testing.assert_array_equal(gen_a.tokens, gen_b.tokens)
  assert set(metrics_a) == set(metrics_b)
  for k in metrics_a:  # the numbers as constants or inputs: XLA may fold x/τ into x·(1/τ)
    np.testing.assert_allclose(metrics_a[k], metrics_b[k], rtol=2e-5, atol=2e-6, err_msg=k)
  np.testing.assert_allclose(state_a.kl_coef, state_b.kl_coef, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_numbers_as_inputs_give_each_configs_own_results_from_one_program():
  """One set of programs (HP's structure, numbers from Frozen.hparams) runs an iteration with HP's
  numbers, then one with another config's (every number changed): the same tokens, metrics,
  weights and adaptive β as each config's own programs (numbers compiled in), and nothing more
  compiled."""
  other = dataclasses.replace(
    HP,
    **{
      "temperature": 1.3,
      "clip_eps": 0.3,
      "clip_eps_high": 0.05,
      "dual_clip": 1.5,
      "vf_clip": 0.05,
      "vf_coef": 2.0,
      "entropy_coef": 0.5,
      "early_stop_kl": 1e-6,
      "gamma": 0.5,
      "lam": 0.3,
      "missing_eos_penalty": 4.0,
      "kl_target": 3.0,
      "kl_horizon": 7.0,
    },
  )
  assert set(NUMBERS) <= {f.name for f in dataclasses.fields(HP)}
  assert all(getattr(HP, n) != getattr(other, n) for n in NUMBERS)  # every number differs
  assert other.structure() == HP.structure()
  state, frozen, fns = build(HP)
  first = iteration(fns, state, frozen.replace(hparams=HP.numbers()))
  # (the steps donate the state they are given: a copy, first's is compared below)
  second = iteration(fns, jax.tree.map(jnp.copy, first[0]), frozen.replace(hparams=other.numbers()))
  # A horizon too short for the batch (1 − 0.2·8/1 < 0 below the target KL), which a compiled-in
  # horizon or the config refuses: as an input it leaves β where it was, positive.
  short = dataclasses.replace(other, kl_horizon=1.0).numbers()
  third = iteration(fns, jax.tree.map(jnp.copy, second[0]), frozen.replace(hparams=short))
  assert third[1]["objective/kl"] < other.kl_target
  assert float(third[0].kl_coef) == float(second[0].kl_coef) > 0
  for name in ("sample", "score", "update", "evaluate"):
    assert getattr(fns, name)._cache_size() == 1, name

  state, frozen, own_fns = build(HP)
  own_first = iteration(own_fns, state, frozen)
  assert float(own_first[0].kl_coef) != pytest.approx(HP.kl_coef)  # the adaptive β moved
  assert_same_run(first, own_first)
  _, frozen, own_fns = build(other)
  own_second = iteration(own_fns, own_first[0], frozen)  # from the same state
  assert second[1]["update/early_stopped"] > 0  # other's early-stop limit was read
  assert_same_run(second, own_second)


def test_structure_keeps_what_shapes_the_program_and_nothing_else():
  a = PPOHparams(clip_eps=0.1, gamma=0.9, vf_clip=None)
  b = PPOHparams(clip_eps=0.3, gamma=0.5, vf_clip=None)
  assert a != b and a.structure() == b.structure()
  assert hash(a.structure()) == hash(b.structure())
  assert PPOHparams(vf_clip=0.2).structure() != a.structure()  # vf_clip on: another program
  assert PPOHparams(num_epochs=2).structure() != PPOHparams().structure()
  assert "vf_clip" not in a.numbers() and a.numbers()["clip_eps"] == np.float32(0.1)
  assert a.structure().is_structure and not a.is_structure
  assert a.structure().with_numbers(a.numbers()) == dataclasses.replace(
    a, **{k: float(v) for k, v in a.numbers().items()}
  )
  s = a.structure()
  assert isinstance(s.clip_eps, ProgramInput) and s.top_p == a.top_p
  with pytest.raises(TypeError, match=r"ppo\.clip_eps is an input of the program"):
    _ = s.clip_eps * 2


def test_numbers_are_checked_when_given():
  s = PPOHparams().structure()
  numbers = PPOHparams().numbers()
  with pytest.raises(ValueError, match=r"hparams numbers: got .*'dual_clip'.* takes"):
    s.with_numbers({**numbers, "dual_clip": 2.0})
  with pytest.raises(ValueError, match=r"hparams numbers: got .* takes .*'gamma'"):
    s.with_numbers({k: v for k, v in numbers.items() if k != "gamma"})
  with pytest.raises(ValueError, match=r"gamma: must be in \[0, 1\], got 1.5"):
    s.with_numbers({**numbers, "gamma": 1.5})
  with pytest.raises(ValueError, match=r"lam must be a scalar"):
    jax.jit(lambda lam: s.with_numbers({**numbers, "lam": lam}).lam)(jnp.ones(2))
  with pytest.raises(ValueError, match=r"a PPOHparams.structure\(\) leaves its numbers"):
    ppo.program_hparams(s, ppo.Frozen(ref_params={}, reward_params=None))
