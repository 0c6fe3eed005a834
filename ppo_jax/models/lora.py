"""LoRA for the policy: adapters trained, base weights frozen and shared with the reference.

With adapters, PPO and DPO keep one copy of the base weights: the policy is ``base + adapters``
and the reference policy is the same base with the adapters off (zero), so no second model is
held.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ppo_jax.models.layers import LoRAParam
from ppo_jax.models.transformer import CausalLM


def check_targets(model_type: str, projections: tuple[str, ...], targets: str) -> None:
  """Refuses LoRA ``targets`` naming a projection the model (of ``projections``) lacks (it would
  silently get none); a run checks its config with it before anything is written."""
  missing = [t for t in targets.split(",") if t not in projections]
  if missing:
    raise ValueError(
      f"lora_targets {targets!r}: this {model_type} model has no {', '.join(missing)} "
      f"projection (it has {', '.join(projections)})"
    )


def add_lora(
  model: CausalLM, *, rank: int, alpha: float = 16.0, targets: str = "q,k,v,o", seed: int = 0
) -> CausalLM:
  """``model`` with fresh adapters (the output is unchanged until they train).

  Targets the model lacks get none (``gate`` on GPT-2), as in checkpoints written before
  ``check_targets`` refused them; at least one must match.
  """
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(
      f"rank must be an integer ≥ 1 (no adapters: do not call add_lora), got {rank!r}"
    )
  if not set(targets.split(",")) & set(model.cfg.projections):
    check_targets(model.cfg.model_type, model.cfg.projections, targets)
  cfg = model.cfg.replace(lora_rank=rank, lora_alpha=alpha, lora_targets=targets)
  adapted = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(seed)))
  graphdef, _, _ = nnx.split(adapted, LoRAParam, ...)
  fresh = nnx.jit(lambda: nnx.state(CausalLM(cfg, rngs=nnx.Rngs(seed)), LoRAParam))()
  return nnx.merge(graphdef, fresh, nnx.state(model, nnx.Param))


def split_lora(model: CausalLM) -> tuple[nnx.GraphDef, dict, dict]:
  """``(graphdef, adapters, base)``: ``nnx.merge(graphdef, adapters, base)`` rebuilds it."""
  graphdef, adapters, base = nnx.split(model, LoRAParam, ...)
  return graphdef, nnx.to_pure_dict(adapters), nnx.to_pure_dict(base)


def merge(graphdef: nnx.GraphDef, variables):
  """``nnx.merge`` of one state or of a tuple of states (adapters, base)."""
  return (
    nnx.merge(graphdef, *variables)
    if isinstance(variables, tuple)
    else nnx.merge(graphdef, variables)
  )


def adapters_off(adapters: dict) -> dict:
  """Zero adapters: with them the model is exactly its base (the reference policy)."""
  return jax.tree.map(jnp.zeros_like, adapters)


def merge_lora(model: CausalLM) -> CausalLM:
  """A plain model with ``W + (α/r)·A B`` folded into each adapted kernel."""
  cfg = model.cfg
  _, adapters, base = split_lora(model)
  scale = cfg.lora_alpha / cfg.lora_rank

  def fold(adapter_node: dict, base_node: dict) -> None:
    for key, sub in adapter_node.items():
      if "lora_a" in sub:  # a Dense: sub = {"lora_a": [in, r], "lora_b": [r, out]}
        kernel = base_node[key]["kernel"]
        delta = scale * (sub["lora_a"].astype(jnp.float32) @ sub["lora_b"].astype(jnp.float32))
        base_node[key]["kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
      else:
        fold(sub, base_node[key])

  fold(adapters, base)
  plain = nnx.eval_shape(lambda: CausalLM(cfg.replace(lora_rank=0), rngs=nnx.Rngs(0)))
  return nnx.merge(nnx.split(plain)[0], base)
