"""Where the PPO step's inputs and outputs live on a mesh: the shardings ``make_step_fns`` uses.

Parameters follow ``sharding.RULES`` (FSDP and tensor axes), their optimizer states alike; rows of a
batch split over the mesh's ``('data', 'fsdp')`` axes; the rest (step, KL coefficient, score
statistics, the key, the PPO numbers) is replicated. ``rollout.Placement`` is this class.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from ppo_jax import sharding as shd
from ppo_jax.ppo import Experience, Frozen, PPOState
from ppo_jax.sampling import Generation


@dataclasses.dataclass(frozen=True)
class Placement:
  """Shardings of what the jitted steps take and return; ``make_step_fns`` jits with them."""

  state: Any  # PPOState of NamedShardings
  frozen: Any  # Frozen of NamedShardings
  batch: Any  # [B, ...] rows over ('data', 'fsdp')
  vector: Any  # [B]
  replicated: Any

  @classmethod
  def build(
    cls, mesh, state: PPOState, frozen: Frozen, tx: optax.GradientTransformation
  ) -> Placement:
    """Parameters by ``sharding.RULES``, optimizer states alike, everything else replicated."""
    rep = shd.replicated(mesh)
    param_sh = shd.param_shardings(state.params, mesh)
    state_sh = PPOState(
      step=rep,
      params=param_sh,
      opt_state=shd.optimizer_shardings(tx, state.params, param_sh, mesh),
      kl_coef=rep,
      score_stats=jax.tree.map(lambda _: rep, state.score_stats),
      key=rep,
    )
    frozen_sh = Frozen(
      ref_params=shd.param_shardings(frozen.ref_params, mesh),
      reward_params=(
        None if frozen.reward_params is None else shd.param_shardings(frozen.reward_params, mesh)
      ),
      horizon=jax.tree.map(lambda _: rep, frozen.horizon),
      hparams=jax.tree.map(lambda _: rep, frozen.hparams),
    )
    return cls(
      state=state_sh,
      frozen=frozen_sh,
      batch=shd.batch_sharding(mesh, 2),
      vector=shd.batch_sharding(mesh, 1),
      replicated=rep,
    )

  @property
  def mesh(self):
    return self.replicated.mesh

  @property
  def generation(self) -> Generation:
    return Generation(tokens=self.batch, logprobs=self.batch, mask=self.batch)

  @property
  def experience(self) -> Experience:
    b = self.batch
    return Experience(
      ids=b,
      mask=b,
      response_mask=b,
      old_logprobs=b,
      ref_logprobs=b,
      old_values=b,
      advantages=b,
      returns=b,
      ok=self.vector,
    )
