"""PPO's hyperparameters, checked when built (static under jit: the dataclass is frozen).

Their numbers may instead be inputs of the compiled programs (``PPOHparams.numbers``,
``structure``, ``with_numbers``): a sweep over clip ε, γ, λ, the coefficients… then runs one
program. Whether an option is on (None or not) stays part of the program.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping

import numpy as np

from ppo_jax import masking
from ppo_jax.kl import KL_KINDS

KL_MODES = ("reward", "loss")
ESTIMATORS = ("gae", "grpo", "rloo")
# The hyperparameters a program may take as inputs: every one only scales, shifts or bounds
# arrays. The others choose shapes or code (sizes, modes, top-p's filter, the warm-up's length).
NUMBERS = (
  "temperature",
  "clip_eps",
  "clip_eps_high",
  "dual_clip",
  "vf_clip",
  "vf_coef",
  "entropy_coef",
  "early_stop_kl",
  "gamma",
  "lam",
  "missing_eos_penalty",
  "kl_target",
  "kl_horizon",
)


class ProgramInput:
  """Stands in ``PPOHparams.structure()`` for a number a program takes as an input; any use
  of it as a number raises (read the number from ``with_numbers``)."""

  __slots__ = ("name",)

  def __init__(self, name: str):
    self.name = name

  def __repr__(self) -> str:
    return f"<input {self.name}>"

  def __eq__(self, other) -> bool:
    return isinstance(other, ProgramInput) and other.name == self.name

  def __hash__(self) -> int:
    return hash((ProgramInput, self.name))

  def _refuse(self, *_):
    raise TypeError(
      f"ppo.{self.name} is an input of the program (PPOHparams.structure()): give its number "
      "with with_numbers(), or Frozen(hparams=hp.numbers())"
    )

  __bool__ = __float__ = __neg__ = _refuse
  __lt__ = __le__ = __gt__ = __ge__ = _refuse
  __add__ = __radd__ = __sub__ = __rsub__ = _refuse
  __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _refuse


@dataclasses.dataclass(frozen=True)
class PPOHparams:
  """PPO's hyperparameters (static under jit). Names follow the papers."""

  # Rollout.
  max_new_tokens: int = 32
  temperature: float = 0.7
  top_k: int = 0
  top_p: float = 1.0
  eos_token_id: int | None = None
  # The model's other stop ids (an Instruct model's end of text beside its end of turn): sampling
  # stops at them too, and a response ending there has its EOS (missing_eos_penalty).
  extra_eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int = 0
  # Update.
  num_epochs: int = 4
  num_minibatches: int = 1
  micro_batch_size: int | None = None  # None: the whole minibatch at once
  clip_eps: float = 0.2
  clip_eps_high: float | None = None
  dual_clip: float | None = None
  vf_clip: float | None = 0.2
  vf_coef: float = 0.1
  entropy_coef: float = 0.0
  agg: str = "token-mean"
  # Early stopping: once a minibatch's policy/approxkl_avg (KL(π_old ‖ π), k3, at the parameters
  # before its update) exceeds this, its update and the iteration's later ones are skipped
  # (None: off). Stable-Baselines3's and Spinning Up's target_kl t stop at 1.5·t.
  early_stop_kl: float | None = None
  # Advantages.
  gamma: float = 1.0
  lam: float = 0.95
  whiten_advantages: bool = True  # GAE only: group estimators are already relative
  whiten_rewards: bool = False
  # Advantage estimator: "gae" (PPO, with a critic) or critic-free over groups of group_size
  # responses to one prompt (consecutive rows): "grpo" (group-normalised) or "rloo".
  estimator: str = "gae"
  group_size: int = 1
  group_std: bool = True  # GRPO divides by the group's std; False: Dr. GRPO (Liu et al. 2025)
  group_std_scope: str = "group"  # group | batch: the std of all the batch's scores
  normalize_scores: bool = False  # by running mean/std of the scores
  missing_eos_penalty: float | None = None  # subtracted from the score of responses without EOS
  recompute_logprobs: bool = True  # old log-probs from a training-style forward, not the sampler
  # KL to the reference policy.
  kl_coef: float = 0.05
  kl_kind: str = "k1"  # in the loss: k2 or k3 (k1's gradient there ignores the reference)
  kl_mode: str = "reward"  # reward: −β·KL per token in the reward; loss: β·KL added to the loss
  kl_adaptive: bool = False
  kl_target: float = 6.0
  kl_horizon: float = 10000.0
  # Critic warm-up: the first iterations update only the critic; the policy (and its optimizer
  # state) stay as they were (OpenRLHF's freezing_actor_steps). GAE only.
  critic_warmup: int = 0

  def __post_init__(self):
    # A jit static must hash: ids given as a list are kept as a tuple, each once.
    object.__setattr__(self, "extra_eos_token_ids", tuple(dict.fromkeys(self.extra_eos_token_ids)))
    checks = {
      "agg": (self.agg, masking.AGG_MODES),
      "kl_kind": (self.kl_kind, KL_KINDS),
      "kl_mode": (self.kl_mode, KL_MODES),
      "estimator": (self.estimator, ESTIMATORS),
    }
    for name, (value, allowed) in checks.items():
      if value not in allowed:
        raise ValueError(f"{name}: unknown {value!r}; expected one of {', '.join(allowed)}")
    if self.estimator != "gae" and self.group_size < 2:
      raise ValueError(
        f"group_size: {self.estimator} compares responses to the same prompt; needs ≥ 2, "
        f"got {self.group_size}"
      )
    ranges = {  # name: (ok, what it must be)
      **{
        name: (getattr(self, name) >= 1, "≥ 1")
        for name in ("num_epochs", "num_minibatches", "max_new_tokens", "group_size")
      },
      "temperature": (self.temperature > 0, "> 0"),
      "top_k": (self.top_k >= 0, "≥ 0 (0: off)"),
      "top_p": (0 < self.top_p <= 1, "in (0, 1]"),
      "clip_eps": (self.clip_eps > 0, "> 0"),
      "kl_coef": (self.kl_coef >= 0, "≥ 0"),
      "kl_horizon": (self.kl_horizon > 0, "> 0"),
      "micro_batch_size": (self.micro_batch_size is None or self.micro_batch_size >= 1, "≥ 1"),
      "critic_warmup": (self.critic_warmup >= 0, "≥ 0"),
      "kl_target": (self.kl_target > 0, "> 0"),
      "dual_clip": (self.dual_clip is None or self.dual_clip > 1, "> 1 (none: off)"),
      "clip_eps_high": (self.clip_eps_high is None or self.clip_eps_high > 0, "> 0"),
      "vf_clip": (self.vf_clip is None or self.vf_clip > 0, "> 0 (none: off)"),
      "vf_coef": (self.vf_coef >= 0, "≥ 0"),
      "early_stop_kl": (self.early_stop_kl is None or self.early_stop_kl > 0, "> 0 (none: off)"),
      "gamma": (0 <= self.gamma <= 1, "in [0, 1]"),
      "lam": (0 <= self.lam <= 1, "in [0, 1]"),
    }
    for name, (ok, what) in ranges.items():
      if not ok:
        raise ValueError(f"{name}: must be {what}, got {getattr(self, name)}")
    if self.kl_mode == "loss" and self.kl_kind == "k1":
      # ∇ of β·(log π − log π_ref) is β·∇log π: π_ref drops out, and over tokens drawn from the
      # policy its mean is zero (Tang & Munos 2025, https://arxiv.org/abs/2506.09477).
      raise ValueError(
        "kl_kind: k1 as a loss term (kl_mode loss) has no gradient towards the reference "
        "(its gradient β·∇log π ignores π_ref); use k2 (gradient of KL(π‖π_ref)) or k3 (GRPO's), "
        "or kl_mode reward"
      )
    if self.kl_adaptive and self.kl_coef == 0:
      raise ValueError("kl_coef: the adaptive controller scales β, so it cannot start at 0")
    if self.missing_eos_penalty is not None and self.eos_token_id is None:
      raise ValueError(
        "missing_eos_penalty: needs eos_token_id (with no EOS every response would be penalised)"
      )
    if self.whiten_rewards and self.estimator != "gae":
      raise ValueError(
        f"whiten_rewards: the {self.estimator} estimator compares each score with its group's, "
        "so it does not read per-token rewards; leave whiten_rewards off"
      )
    if self.critic_warmup and self.estimator != "gae":
      raise ValueError(f"critic_warmup: the {self.estimator} estimator has no critic to warm up")

  def numbers(self) -> dict[str, np.float32]:
    """The numbers a program may take as inputs (``NUMBERS`` not None), as float32 scalars:
    ``Frozen(hparams=hp.numbers())`` runs ``rollout.make_step_fns``' programs with them."""
    return {name: np.float32(getattr(self, name)) for name in self._number_names()}

  def structure(self) -> PPOHparams:
    """What compiles into a program: these hyperparameters with each of ``numbers()`` replaced
    by a ``ProgramInput``. Two configs that differ only in those numbers have equal
    structures (and hashes: one jit cache entry)."""
    out = copy.copy(self)
    for name in self._number_names():
      object.__setattr__(out, name, ProgramInput(name))
    return out

  def with_numbers(self, numbers: Mapping[str, object]) -> PPOHparams:
    """These hyperparameters with ``numbers`` (the keys of ``numbers()``, arrays or tracers).
    Concrete numbers are checked as in the constructor; traced ones (inside jit) are not."""
    want, got = set(self._number_names()), set(numbers)
    if want != got:
      raise ValueError(
        f"hparams numbers: got {sorted(got)}, this PPOHparams takes {sorted(want)} (a sweep may "
        "change numbers, not whether an option is on: None)"
      )
    values = {name: masking.concrete(v) for name, v in numbers.items()}
    if all(v is not None and v.shape == () for v in values.values()):
      return dataclasses.replace(self, **{name: v.item() for name, v in values.items()})
    out = copy.copy(self)
    for name, v in numbers.items():
      if np.shape(v) != ():
        raise ValueError(f"hparams numbers: {name} must be a scalar, got shape {np.shape(v)}")
      object.__setattr__(out, name, v)
    return out

  @property
  def is_structure(self) -> bool:
    """Whether some numbers are ``ProgramInput`` placeholders (``structure()``)."""
    return any(isinstance(getattr(self, name), ProgramInput) for name in NUMBERS)

  def _number_names(self) -> tuple[str, ...]:
    return tuple(name for name in NUMBERS if getattr(self, name) is not None)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Every id a response stops at: ``eos_token_id`` (if any) then ``extra_eos_token_ids``."""
    head = () if self.eos_token_id is None else (self.eos_token_id,)
    return tuple(dict.fromkeys((*head, *self.extra_eos_token_ids)))

  def minibatch_layout(self, batch_size: int) -> tuple[int, int]:
    """``(minibatch size, micro-batches per minibatch)`` for a rollout of ``batch_size``."""
    if batch_size % self.num_minibatches:
      raise ValueError(
        f"ppo.batch_size {batch_size} is not divisible by ppo.num_minibatches "
        f"{self.num_minibatches}"
      )
    mb = batch_size // self.num_minibatches
    micro = self.micro_batch_size or mb
    if mb % micro:
      raise ValueError(
        f"ppo.micro_batch_size {micro} does not divide the minibatch size {mb} (ppo.batch_size "
        "/ ppo.num_minibatches)"
      )
    return mb, mb // micro
