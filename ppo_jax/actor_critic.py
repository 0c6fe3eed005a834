"""Policy, critic and reward model as pure functions of plain-dict parameters.

``ActorCritic`` holds the static half (NNX graph definitions, hashable, usable as a jit static);
the parameters travel as pytrees: ``params = {"policy": ..., "value": ...}``. The critic is either
a separate ``ValueModel`` or a ``ScalarHead`` reading the policy's own hidden states
(``shared_trunk``: one forward pass gives logits and values, and no second trunk in memory).

Sequences follow the data layout ``[prompt (P, left-padded) | response (N)]``; the hidden state at
position ``t`` predicts token ``t + 1``, so the response's logits and values are read at positions
``P − 1 … P + N − 2``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from ppo_jax.logprobs import token_logprobs
from ppo_jax.models.transformer import CausalLM, RewardModel, ScalarHead, ValueModel

Params = Any


@dataclasses.dataclass(frozen=True)
class ActorCritic:
  """Graph definitions of the models PPO runs (no arrays)."""

  policy: nnx.GraphDef  # CausalLM
  value: nnx.GraphDef  # ValueModel, or ScalarHead when shared_trunk
  shared_trunk: bool
  reward: nnx.GraphDef | None = None  # RewardModel; None when scores come from a function

  @classmethod
  def build(
    cls, policy: CausalLM, value: ValueModel | ScalarHead, reward: RewardModel | None = None
  ) -> tuple[ActorCritic, Params, Params | None]:
    """Splits live models into ``(ActorCritic, trainable params, reward params)``."""
    pg, pp = nnx.split(policy)
    vg, vp = nnx.split(value)
    rg, rp = nnx.split(reward) if reward is not None else (None, None)
    models = cls(policy=pg, value=vg, shared_trunk=isinstance(value, ScalarHead), reward=rg)
    params = {"policy": nnx.to_pure_dict(pp), "value": nnx.to_pure_dict(vp)}
    return models, params, (nnx.to_pure_dict(rp) if rp is not None else None)


def response_hidden(trunk, ids_BxL: jax.Array, mask_BxL: jax.Array, n: int) -> jax.Array:
  """Hidden states ``[B, N, D]`` that predict the last ``n`` tokens of each sequence."""
  hidden = trunk.hidden(ids_BxL, mask_BxL)
  return hidden[:, -n - 1 : -1]


def policy_logits(
  graphdef: nnx.GraphDef, params: Params, ids_BxL, mask_BxL, n: int
) -> tuple[jax.Array, jax.Array]:
  """Float32 logits ``[B, N, V]`` of the response tokens, and the hidden states ``[B, N, D]``."""
  policy: CausalLM = nnx.merge(graphdef, params)
  hidden = response_hidden(policy.trunk, ids_BxL, mask_BxL, n)
  return policy.unembed(hidden), hidden


def forward(
  models: ActorCritic, params: Params, ids_BxL, mask_BxL, n: int
) -> tuple[jax.Array, jax.Array]:
  """``(logits [B, N, V], values [B, N])`` of the response tokens under the current params."""
  logits, hidden = policy_logits(models.policy, params["policy"], ids_BxL, mask_BxL, n)
  if models.shared_trunk:
    values = nnx.merge(models.value, params["value"])(hidden)
  else:
    critic: ValueModel = nnx.merge(models.value, params["value"])
    values = critic.head(response_hidden(critic.trunk, ids_BxL, mask_BxL, n))
  return logits, values


def response_logprobs(
  graphdef, params, ids_BxL, mask_BxL, n: int, *, temperature: float
) -> jax.Array:
  """``token_logprobs`` of the last ``n`` tokens ``[B, N]``."""
  logits, _ = policy_logits(graphdef, params, ids_BxL, mask_BxL, n)
  return token_logprobs(logits, ids_BxL[:, -n:], temperature=temperature)


def reward_scores(graphdef: nnx.GraphDef, params: Params, ids_BxL, mask_BxL) -> jax.Array:
  """Reward-model scores ``[B]`` read at each sequence's last real token."""
  rm: RewardModel = nnx.merge(graphdef, params)
  return rm(ids_BxL, mask_BxL)
