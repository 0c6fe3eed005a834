"""ppo_jax: RLHF with PPO for language models in JAX.

The maths layer is re-exported here so a notebook needs one import::

  import ppo_jax as pj
  loss, metrics = pj.policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2)

Models live in ``ppo_jax.models``, sampling in ``ppo_jax.sampling`` (``pj.generate``), checkpoints
in ``ppo_jax.checkpoint``.
"""

from ppo_jax import models, synthetic, tokenizer
from ppo_jax.advantages import gae, group_advantages, rloo_advantages
from ppo_jax.kl import adaptive_kl_update, kl_estimate
from ppo_jax.logprobs import entropy_from_logits, token_logprobs
from ppo_jax.losses import policy_loss, value_loss
from ppo_jax.masking import agg_weight, aggregate, masked_mean, masked_whiten
from ppo_jax.preference import bradley_terry_loss, dpo_loss
from ppo_jax.sampling import Generation, generate

__version__ = "0.1.0"

__all__ = [
  "Generation",
  "adaptive_kl_update",
  "agg_weight",
  "aggregate",
  "bradley_terry_loss",
  "dpo_loss",
  "entropy_from_logits",
  "gae",
  "generate",
  "group_advantages",
  "kl_estimate",
  "masked_mean",
  "masked_whiten",
  "models",
  "policy_loss",
  "rloo_advantages",
  "synthetic",
  "token_logprobs",
  "tokenizer",
  "value_loss",
]
