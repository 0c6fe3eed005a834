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
import jax.numpy as jnp
from flax import nnx

from ppo_jax.logprobs import token_logprobs
from ppo_jax.models.lora import adapters_off, merge, split_lora
from ppo_jax.models.transformer import CausalLM, RewardModel, ScalarHead, ValueModel

Params = Any


@dataclasses.dataclass(frozen=True)
class ActorCritic:
  """Graph definitions of the models PPO runs (no arrays)."""

  policy: nnx.GraphDef  # CausalLM (with LoRA: split into adapters and base)
  value: nnx.GraphDef | None  # ValueModel, ScalarHead when shared_trunk, None: no critic
  shared_trunk: bool
  reward: nnx.GraphDef | None = None  # RewardModel; None when scores come from a function
  lora: bool = False  # the policy trains adapters over frozen base weights

  @classmethod
  def build(
    cls,
    policy: CausalLM,
    value: ValueModel | ScalarHead | None,
    reward: RewardModel | None = None,
  ) -> tuple[ActorCritic, Params, Params, Params | None]:
    """Splits live models into ``(ActorCritic, trainable params, frozen policy, reward params)``.

    The frozen policy is the reference policy's weights: a copy of the policy's, or with LoRA
    the base weights that policy (base + adapters) and reference (base, adapters off) share.
    """
    lora = policy.cfg.lora_rank > 0
    if lora:
      pg, pp, frozen_policy = split_lora(policy)
    else:
      pg, pp = nnx.split(policy)
      pp = nnx.to_pure_dict(pp)
      frozen_policy = jax.tree.map(jnp.copy, pp)
    vg, vp = nnx.split(value) if value is not None else (None, {})
    rg, rp = nnx.split(reward) if reward is not None else (None, None)
    models = cls(
      policy=pg, value=vg, shared_trunk=isinstance(value, ScalarHead), reward=rg, lora=lora
    )
    params = {"policy": pp, "value": nnx.to_pure_dict(vp) if value is not None else {}}
    return models, params, frozen_policy, (nnx.to_pure_dict(rp) if rp is not None else None)

  def policy_vars(self, policy_params: Params, frozen_policy: Params) -> Params:
    """What ``nnx.merge`` needs for the policy: its params, or (adapters, base)."""
    return (policy_params, frozen_policy) if self.lora else policy_params

  def reference_vars(self, policy_params: Params, frozen_policy: Params) -> Params:
    """The reference policy: its frozen copy, or the base with the adapters off."""
    return (adapters_off(policy_params), frozen_policy) if self.lora else frozen_policy


def response_hidden(trunk, ids_BxL: jax.Array, mask_BxL: jax.Array, n: int) -> jax.Array:
  """Hidden states ``[B, N, D]`` that predict the last ``n`` tokens of each sequence."""
  hidden = trunk.hidden(ids_BxL, mask_BxL)
  return hidden[:, -n - 1 : -1]


def policy_logits(
  graphdef: nnx.GraphDef, params: Params, ids_BxL, mask_BxL, n: int
) -> tuple[jax.Array, jax.Array]:
  """Float32 logits ``[B, N, V]`` of the response tokens, and the hidden states ``[B, N, D]``.

  ``params``: the policy's state, or a tuple of states (``ActorCritic.policy_vars``)."""
  policy: CausalLM = merge(graphdef, params)
  hidden = response_hidden(policy.trunk, ids_BxL, mask_BxL, n)
  return policy.unembed(hidden), hidden


def forward(
  models: ActorCritic, params: Params, ids_BxL, mask_BxL, n: int, *, frozen_policy=None
) -> tuple[jax.Array, jax.Array]:
  """``(logits [B, N, V], values [B, N])`` of the response tokens under the current params
  (``frozen_policy``: the base weights, needed with LoRA)."""
  policy_vars = models.policy_vars(params["policy"], frozen_policy)
  logits, hidden = policy_logits(models.policy, policy_vars, ids_BxL, mask_BxL, n)
  return logits, critic_values(models, params, ids_BxL, mask_BxL, n, policy_hidden=hidden)


def critic_values(
  models: ActorCritic, params: Params, ids_BxL, mask_BxL, n: int, *, policy_hidden=None
) -> jax.Array:
  """Values ``[B, N]`` of the response positions: zeros without a critic, the value head on
  ``policy_hidden`` (the policy's ``[B, N, D]``, required) with a shared trunk, else the value
  model's own forward pass."""
  B = ids_BxL.shape[0]
  if models.value is None:  # critic-free (GRPO, RLOO)
    return jnp.zeros((B, n), jnp.float32)
  if models.shared_trunk:
    if policy_hidden is None:
      raise ValueError("a value head on the policy trunk needs policy_hidden")
    return nnx.merge(models.value, params["value"])(policy_hidden)
  critic: ValueModel = nnx.merge(models.value, params["value"])
  return critic.head(response_hidden(critic.trunk, ids_BxL, mask_BxL, n))


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


def build_critic(
  policy: CausalLM, reward_model: RewardModel | None, *, shared_trunk: bool, init: str, seed: int
) -> ValueModel | ScalarHead:
  """The critic: a zero-initialised head on the policy's trunk, or a ValueModel initialised from
  the reward model (``init="reward_model"``) or from the policy's trunk with a zero head."""
  cfg = policy.cfg
  if shared_trunk:
    return ScalarHead(
      cfg.hidden_size, zero_init=True, param_dtype=cfg.param_dtype, rngs=nnx.Rngs(seed)
    )
  critic = ValueModel(cfg, rngs=nnx.Rngs(seed), zero_init_head=True)
  source = reward_model if init == "reward_model" else policy
  if init == "reward_model" and reward_model is None:
    raise ValueError("ppo.critic_init='reward_model' but there is no reward model")
  if source.cfg.hidden_size != cfg.hidden_size or source.cfg.num_layers != cfg.num_layers:
    raise ValueError(
      "ppo.critic_init='reward_model' needs a reward model of the policy's "
      "architecture; use ppo.critic_init='policy'"
    )
  nnx.update(critic.trunk, nnx.state(source.trunk))
  if init == "reward_model":
    nnx.update(critic.head, nnx.state(reward_model.head))
  return critic
