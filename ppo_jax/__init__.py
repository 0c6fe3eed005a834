"""ppo_jax: RLHF with PPO for language models in JAX.

The maths layer is re-exported here so a notebook needs one import::

  import ppo_jax as pj
  loss, metrics = pj.policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2)

Models live in ``ppo_jax.models``, sampling in ``ppo_jax.sampling`` (``pj.generate``), checkpoints
in ``ppo_jax.checkpoint``.

The names below are imported on first use (PEP 562), so ``import ppo_jax.main`` (the ``ppo-jax``
command) starts without JAX's second of imports and can take a Ctrl-C there as a stop of its own.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_FROM = {
  "gae": "advantages",
  "group_advantages": "advantages",
  "rloo_advantages": "advantages",
  "adaptive_kl_update": "kl",
  "kl_estimate": "kl",
  "entropy_from_logits": "logprobs",
  "token_logprobs": "logprobs",
  "policy_loss": "losses",
  "value_loss": "losses",
  "agg_weight": "masking",
  "aggregate": "masking",
  "masked_mean": "masking",
  "masked_var": "masking",
  "masked_whiten": "masking",
  "bradley_terry_loss": "preference",
  "dpo_loss": "preference",
  "Generation": "sampling",
  "generate": "sampling",
}
_SUBMODULES = ("models", "synthetic", "tokenizer")

__all__ = [  # _FROM's names and the submodules
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
  "masked_var",
  "masked_whiten",
  "models",
  "policy_loss",
  "rloo_advantages",
  "synthetic",
  "token_logprobs",
  "tokenizer",
  "value_loss",
]


def __getattr__(name: str) -> Any:
  if name in _SUBMODULES or (
    not name.startswith("_") and importlib.util.find_spec(f"ppo_jax.{name}") is not None
  ):  # ``pj.losses``, ``pj.sharding``, … as when the package imported them all
    return importlib.import_module(f"ppo_jax.{name}")
  if name in _FROM:
    value = getattr(importlib.import_module(f"ppo_jax.{_FROM[name]}"), name)
    globals()[name] = value  # looked up once
    return value
  raise AttributeError(f"module 'ppo_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what editors and type checkers see
  from ppo_jax import models, synthetic, tokenizer
  from ppo_jax.advantages import gae, group_advantages, rloo_advantages
  from ppo_jax.kl import adaptive_kl_update, kl_estimate
  from ppo_jax.logprobs import entropy_from_logits, token_logprobs
  from ppo_jax.losses import policy_loss, value_loss
  from ppo_jax.masking import agg_weight, aggregate, masked_mean, masked_var, masked_whiten
  from ppo_jax.preference import bradley_terry_loss, dpo_loss
  from ppo_jax.sampling import Generation, generate
