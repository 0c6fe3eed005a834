"""DPO as a pipeline stage: offline preference pairs, no reward model, no sampling in training.

The reference is the SFT policy; its sequence log-probabilities of every chosen and rejected
response are computed once, before training, and travel in the batches. Training is the
supervised loop of ``ppo_jax.supervised`` with ``preference.dpo_loss`` (Rafailov et al. 2023).
Afterwards the policy is evaluated like the RL stages: samples on held-out prompts, their gold
score and their KL to the reference.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ppo_jax import evaluation, ppo, rl, rollout, stage_checkpoints, supervised, writers
from ppo_jax import sharding as shd
from ppo_jax.actor_critic import ActorCritic, merge, policy_logits
from ppo_jax.data import Sequences
from ppo_jax.export import export_record, generation_defaults
from ppo_jax.logprobs import token_logprobs
from ppo_jax.masking import masked_count, masked_sum
from ppo_jax.models import CausalLM
from ppo_jax.models.lora import merge_lora
from ppo_jax.preference import DPO_LOSSES, dpo_loss

KEYS = {"gold": "gold/score", "kl": "objective/kl", "length": "response/length"}


@dataclasses.dataclass(frozen=True)
class DPOSettings:
  beta: float = 0.1  # β: strength of the implicit KL constraint
  label_smoothing: float = 0.0  # ε: conservative DPO for noisy labels
  loss: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge (preference.dpo_loss)
  rpo_alpha: float = 0.0  # α·NLL of the chosen responses added (RPO); 0: none
  eval_every: int = 20  # steps between held-out sampling evaluations (0: before and after only)

  def __post_init__(self):
    if self.beta <= 0:
      raise ValueError(f"beta: must be > 0, got {self.beta}")
    if not 0.0 <= self.label_smoothing < 0.5:
      raise ValueError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
    if self.rpo_alpha < 0:
      raise ValueError(f"rpo_alpha: must be ≥ 0 (0: none), got {self.rpo_alpha}")
    if self.loss not in DPO_LOSSES:
      raise ValueError(f"loss: unknown {self.loss!r}; expected one of {', '.join(DPO_LOSSES)}")
    if self.loss != "sigmoid" and self.label_smoothing:
      raise ValueError(
        f"label_smoothing: conservative DPO's ε applies to loss='sigmoid', not {self.loss!r}"
      )
    if self.eval_every < 0:
      raise ValueError(f"eval_every: must be ≥ 0, got {self.eval_every}")


def sequence_logprobs(graphdef, params, ids_BxL, mask_BxL, response_mask_BxR) -> jax.Array:
  """``Σₜ m·log π(yₜ | y<ₜ, x)`` per sequence ``[B]`` over the response tokens (temperature 1)."""
  n = response_mask_BxR.shape[1]
  logits, _ = policy_logits(graphdef, params, ids_BxL, mask_BxL, n)
  return masked_sum(token_logprobs(logits, ids_BxL[:, -n:]), response_mask_BxR, axis=-1)


def dpo_objective(
  params,
  graphdef,
  batch,
  *,
  beta: float,
  label_smoothing: float = 0.0,
  loss: str = "sigmoid",
  rpo_alpha: float = 0.0,
):
  """``dpo_loss`` of a batch of pairs: chosen and rejected in one forward of 2B rows. IPO's
  log-probabilities (policy and reference) are averaged over each response's tokens; its metrics
  but the loss (the implicit rewards, their margin, the accuracy) come from the sums, as every
  loss's do, so that they compare across losses.

  ``rpo_alpha`` α > 0 adds α·NLL of the chosen responses, each one's mean over its tokens,
  averaged over the pairs (RPO, Pang et al. 2024, https://arxiv.org/abs/2404.19733: the chosen
  responses' likelihood is kept up while the margin grows); logged as ``nll_chosen``."""
  B = batch["chosen_ids"].shape[0]
  both = {
    k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
    for k in ("ids", "mask", "response_mask")
  }
  logp = sequence_logprobs(graphdef, params, both["ids"], both["mask"], both["response_mask"])
  ref = jnp.concatenate([batch["ref_chosen"], batch["ref_rejected"]])
  summed = lambda kind: dpo_loss(
    logp[:B], logp[B:], ref[:B], ref[B:], beta=beta, label_smoothing=label_smoothing, kind=kind
  )
  tokens = jnp.maximum(masked_count(both["response_mask"], axis=-1), 1.0).astype(logp.dtype)
  if loss == "ipo":
    lp, rf = logp / tokens, ref / tokens
    value, _ = dpo_loss(lp[:B], lp[B:], rf[:B], rf[B:], beta=beta, kind="ipo")
    _, metrics = summed("sigmoid")
  else:
    value, metrics = summed(loss)
  if rpo_alpha:
    nll = jnp.mean(-logp[:B] / tokens[:B])
    value = value + rpo_alpha * nll
    metrics = {**metrics, "nll_chosen": jax.lax.stop_gradient(nll)}
  return value, {**metrics, "loss": jax.lax.stop_gradient(value)}


def pair_batch(pairs: tuple[Sequences, Sequences], ref: tuple[np.ndarray, np.ndarray], idx):
  chosen, rejected = pairs
  batch = supervised.pair_batch(pairs, idx)
  batch.pop("margin", None)  # the reward model's; DPO's loss has none
  batch["chosen_response_mask"] = chosen.response_mask[idx]
  batch["rejected_response_mask"] = rejected.response_mask[idx]
  batch["ref_chosen"], batch["ref_rejected"] = ref[0][idx], ref[1][idx]
  return batch


def reference_logprobs(
  graphdef, params, seqs: Sequences, batch_size: int, *, mesh=None
) -> np.ndarray:
  """Sequence log-probabilities ``[N]`` of ``seqs`` under ``params``, in fixed-size batches (on a
  ``mesh``, rows split over ``('data', 'fsdp')``; every process gets all ``N``)."""
  if not len(seqs):  # no held-out pairs
    return np.zeros(0, np.float32)
  if mesh is not None:
    shd.check_batch(batch_size, mesh, "the DPO batch size")
  fn = jax.jit(functools.partial(sequence_logprobs, graphdef))
  put = jnp.asarray if mesh is None else lambda x: shd.place_batch(x, shd.batch_sharding(mesh))
  out = []
  for start in range(0, len(seqs), batch_size):
    idx = np.arange(start, start + batch_size) % len(seqs)  # the last batch padded: one shape
    part = seqs.take(idx)
    logp = fn(params, put(part.ids), put(part.mask), put(part.response_mask))
    out.append(shd.to_host(logp)[: min(batch_size, len(seqs) - start)])
  return np.concatenate(out)


def run_dpo_stage(
  s,
  policy: CausalLM,
  pairs: tuple[tuple[Sequences, Sequences], tuple[Sequences, Sequences]],
  eval_prompts: evaluation.Prompts,
  tokenizer: Any,
  hp: ppo.PPOHparams,
  workdir: pathlib.Path,
  *,
  gold=None,
  tokenizer_path: str | None = None,
  base_policy=None,
  mesh=None,
) -> tuple[rl.PPOResult, dict[str, float]]:
  """Trains ``policy`` (the SFT policy, also the reference) with DPO on ``pairs``
  (``(train, held-out)``, each ``(chosen, rejected)``).

  Returns ``(result, held-out DPO metrics)``; ``result.before``/``after`` are the held-out
  sampling evaluations (gold score, KL to the reference, length) of the reference and of the
  trained policy, with the RL stages' sampler settings, which are also logged to
  ``WORKDIR/metrics.jsonl`` every ``dpo.eval_every`` steps. Its checkpoints
  (``WORKDIR/dpo_checkpoints``) name ``policy.cfg`` and ``tokenizer_path`` for ``ppo-jax export``.

  A ``policy`` with LoRA adapters (``models.lora.add_lora``) trains only them: the reference is
  its base weights with the adapters off, the optimizer holds moments of the adapters alone, the
  checkpoints hold the adapters (``base_policy``, the base's folder, is named for the export), and
  the returned policy has them merged.
  """
  train_pairs, eval_pairs = pairs
  # The reference: the policy's weights, frozen (with LoRA: the base under the adapters); sampled
  # with the RL stages' machinery (no critic, no reward model).
  with shd.staged_on_host(mesh):  # the reference's copy of a policy still on the host stays there
    models, params, frozen_policy, _ = ActorCritic.build(policy, None, None)
  graphdef = models.policy
  frozen = ppo.Frozen(ref_params=frozen_policy, reward_params=None)
  if mesh is None:  # committed, trained here or loaded alike: a resume's programs are cached
    frozen = jax.device_put(frozen, shd.device_of(frozen.ref_params))
  # What trains from: the adapters, or the reference's copy of the weights (train copies them
  # before its step donates them).
  start = params["policy"] if models.lora else frozen.ref_params
  del params, frozen_policy  # no unplaced copy outlives the placement
  placement = None
  if mesh is not None:  # sampled as PPO samples: the policy and the reference by the rules
    like = jax.eval_shape(
      functools.partial(ppo.init_state, tx=optax.identity(), hp=hp, seed=0), {"policy": start}
    )
    placement = rollout.Placement.build(mesh, like, frozen, optax.identity())
    frozen = shd.place(frozen, placement.frozen)
    start = shd.place(start, placement.state.params["policy"]) if models.lora else frozen.ref_params
  fns = rollout.make_step_fns(models, optax.identity(), hp, placement=placement)
  kw = dict(
    batch_size=s.ppo_run.batch_size,
    scorer=evaluation.Scorer(),
    gold=gold,
    seed=s.seed + 1,
    placement=placement,
  )

  def held_out_samples(p) -> dict[str, float]:
    if not len(eval_prompts):
      return {}
    row = evaluation.evaluate(fns, p, frozen, eval_prompts, tokenizer, **kw)
    return {k: v for k, v in row.items() if k != "score"}  # nothing scores DPO's samples

  bs = s.dpo.micro_batch_size or s.dpo.batch_size  # what fits in training fits here
  reference = models.reference_vars(start, frozen.ref_params)
  ref = [tuple(reference_logprobs(graphdef, reference, x, bs, mesh=mesh) for x in p) for p in pairs]
  total, every = s.dpo.steps(len(train_pairs[0])), s.dpo_run.eval_every
  curve: dict[str, writers.MetricsWriter] = {}  # opened at the first step trained here
  clock = {"eval": 0.0, "done": None}

  if not len(eval_prompts):
    print("data.eval_prompts=0: no held-out sampling evaluations (DPO writes no metrics.jsonl)")

  def on_params(step, p):  # gold/score, objective/kl, response/length as the RL stages log them
    if not curve and len(eval_prompts):  # rows past a resumed checkpoint's step are dropped
      curve["w"] = writers.MetricsWriter(
        workdir / "metrics.jsonl",
        tensorboard_dir=workdir / "tensorboard" if s.log.tensorboard else None,
        resume_step=step - 1 if step > 1 else -1,  # a fresh stage drops an earlier try's rows
      )
      if every and step == 1:  # a fresh stage: the reference's samples are step 0
        curve["w"].write(0, {KEYS.get(k, k): v for k, v in before.items()})
    if every and len(eval_prompts) and (step % every == 0 or step == total):
      t = time.perf_counter()
      curve["w"].write(step, {KEYS.get(k, k): v for k, v in held_out_samples(p).items()})
      clock["eval"] += time.perf_counter() - t
    if step == total:
      clock["done"] = time.perf_counter()

  before = held_out_samples(start)  # the reference's samples: the adapters start at zero
  t0 = time.perf_counter()
  try:
    data_arrays = [x for q in train_pairs for x in (q.ids, q.mask, q.response_mask)]
    meta = export_record(
      policy.cfg,
      tokenizer_path,
      base_policy,
      workdir=workdir,
      generation_config=generation_defaults(s),
    )
    with stage_checkpoints.for_stage(s, workdir, "dpo", *data_arrays, meta=meta) as checkpoints:
      params, held_out = supervised.fit(
        "dpo",
        start,
        graphdef,
        functools.partial(dpo_objective, loss=s.dpo_run.loss, rpo_alpha=s.dpo_run.rpo_alpha),
        s.dpo,
        (lambda i: pair_batch(train_pairs, ref[0], i), len(train_pairs[0])),
        (lambda i: pair_batch(eval_pairs, ref[1], i), len(eval_pairs[0])),
        workdir=workdir,
        seed=s.seed + 4,
        progress=s.log.progress,
        on_params=on_params,
        checkpoints=checkpoints,
        mesh=mesh,
        frozen=frozen.ref_params if models.lora else None,
        max_nonfinite=s.ppo_run.max_nonfinite,
        # Inputs of the step, not constants: a β sweep runs one program.
        loss_args={
          "beta": np.float32(s.dpo_run.beta),
          "label_smoothing": np.float32(s.dpo_run.label_smoothing),
        },
      )
  finally:
    if curve:
      curve["w"].close()
  # The training steps alone, of this invocation (a resumed stage's steps after its checkpoint)
  held_out["train_seconds"] = (clock["done"] or t0) - t0 - clock["eval"]
  after = held_out_samples(params)
  final = models.policy_vars(params, frozen.ref_params)
  if jax.process_count() > 1:  # save_pretrained needs whole arrays on this host
    final = jax.tree.map(shd.to_host, final)
  trained = merge(graphdef, final)
  return rl.PPOResult(merge_lora(trained) if models.lora else trained, before, after, []), held_out
