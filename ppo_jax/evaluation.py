"""A policy's held-out evaluation and sample rows, shared by the RL stages (``rl``) and DPO: the
prompts, where scores come from, and the sampled-and-scored metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ppo_jax import ppo, rollout
from ppo_jax import sharding as shd
from ppo_jax.models.transformer import RewardModel
from ppo_jax.rewards import (
  RewardError,
  RewardFn,
  RewardSum,
  call_reward_parts,
  components,
  reward_fn_where,
  summed,
)
from ppo_jax.sampling import Generation


@dataclasses.dataclass
class Prompts:
  texts: list[str]
  ids: np.ndarray  # [N, P] int32, left-padded
  mask: np.ndarray  # [N, P] int32
  # The rows' other fields, one list each, for reward functions (data.load_prompts_and_columns).
  columns: dict[str, list] = dataclasses.field(default_factory=dict)

  def take(self, idx) -> Prompts:
    return Prompts(
      [self.texts[i] for i in idx],
      self.ids[idx],
      self.mask[idx],
      {k: [v[i] for i in idx] for k, v in self.columns.items()},
    )

  def head(self, k: int) -> dict[str, list]:
    """The first ``k`` rows' columns."""
    return {name: v[:k] for name, v in self.columns.items()}

  def __len__(self) -> int:
    return len(self.texts)


def decode_responses(tokenizer: Any, tokens_BxN, mask_BxN) -> list[str]:
  """Response texts without padding or special tokens."""
  tokens, mask = np.asarray(tokens_BxN), np.asarray(mask_BxN)
  return tokenizer.batch_decode(
    [t[m > 0].tolist() for t, m in zip(tokens, mask, strict=True)], skip_special_tokens=True
  )


def shared_scores(
  fn: RewardFn | RewardSum,
  prompts: Prompts,
  responses: list[str],
  *,
  name: str = "reward function",
  step: int | None = None,
) -> np.ndarray:
  """``fn``'s float32 scores ``[B]`` of the rows (``call_reward_fn``; a ``RewardSum``'s weighted
  sum), on every process: ``shared_score_parts``, summed."""
  parts = shared_score_parts(fn, prompts, responses, name=name, step=step)
  return summed(fn, parts, name=name, step=step)


def shared_score_parts(
  fn: RewardFn | RewardSum,
  prompts: Prompts,
  responses: list[str],
  *,
  name: str = "reward function",
  step: int | None = None,
) -> np.ndarray:
  """Each of ``fn``'s components' float32 scores ``[B, K]`` of the rows
  (``call_reward_parts``), on every process. With several processes each scores its own
  contiguous share of the rows, about B / processes, cut only between different prompts (a
  prompt's group of responses stays whole, for a function that scores them against each other),
  and the shares are gathered: a costly function (a judge model, running code) is spread over
  the hosts instead of run whole on each, and every host holds the same scores. A failure on one
  process is raised on all of them: there as itself, elsewhere naming that process (no host is
  left waiting in a collective for one that stopped)."""
  n, k = len(responses), len(components(fn))
  count = jax.process_count()
  if count == 1:
    return call_reward_parts(
      fn, prompts.texts, responses, columns=prompts.columns, name=name, step=step
    )
  # Where a share may start: where the prompt changes. Each share starts at the first such row
  # at or past its even cut.
  starts = [0, *(i for i in range(1, n) if prompts.texts[i] != prompts.texts[i - 1]), n]
  even = [-(-c * n // count) for c in range(1, count)]
  bounds = np.r_[0, [starts[np.searchsorted(starts, c)] for c in even], n]
  lo, hi = bounds[jax.process_index()], bounds[jax.process_index() + 1]
  mine, error = np.zeros((max(np.diff(bounds)), k), np.float32), None
  if hi > lo:
    try:
      share = prompts.take(np.arange(lo, hi))
      mine[: hi - lo] = call_reward_parts(
        fn,
        share.texts,
        responses[lo:hi],
        columns=share.columns,
        name=name,
        step=step,
        first=lo,
        total=n,
      )
    except RewardError as e:
      error = e
  from jax.experimental import multihost_utils

  ok = np.full((1, k), np.float32(error is None))
  every = np.asarray(multihost_utils.process_allgather(np.concatenate([ok, mine])))
  if error is not None:
    raise error
  if (failed := np.flatnonzero(every[:, 0, 0] == 0)).size:
    raise RewardError(
      f"{reward_fn_where(name, step)} failed on process {failed[0]} (its error is on that "
      "process's stderr)"
    )
  return np.concatenate([every[i, 1 : 1 + size] for i, size in enumerate(np.diff(bounds))])


@dataclasses.dataclass
class Scorer:
  """Where scores come from: the reward model (on device) or a Python function (on the host)."""

  reward_model: RewardModel | None = None
  fn: RewardFn | None = None
  fn_name: str = "reward function"


def padded_batches(n: int, rows: int, width: int | None = None):
  """``(start, real, take)`` for each batch of ``rows`` of ``n`` (the last one shorter): ``take``
  holds its ``real`` row indices, then copies of the first up to ``width`` (default ``rows``), so
  every call has one shape; what the padding rows give is dropped."""
  width = rows if width is None else width
  for start in range(0, n, rows):
    real = min(rows, n - start)
    yield (
      start,
      real,
      np.concatenate([np.arange(start, start + real), np.full(width - real, start)]),
    )


def put_rows(x, placement: rollout.Placement | None, *, vector: bool = False) -> jax.Array:
  """Host rows onto the devices: split over ('data', 'fsdp') when sharded."""
  if placement is None:
    return jnp.asarray(x)
  return shd.place_batch(x, placement.vector if vector else placement.batch)


def host_generation(gen: Generation) -> Generation:
  return Generation(
    tokens=shd.to_host(gen.tokens), logprobs=shd.to_host(gen.logprobs), mask=shd.to_host(gen.mask)
  )


def evaluate(
  fns: rollout.StepFns,
  policy_params,
  frozen: ppo.Frozen,
  prompts: Prompts,
  tokenizer: Any,
  *,
  batch_size: int,
  scorer: Scorer,
  gold: RewardFn | None,
  seed: int,
  placement: rollout.Placement | None = None,
) -> dict[str, float]:
  """Mean score (reward model or function), gold score, KL to the reference and response length
  of the policy's samples on held-out prompts, with the training sampler and settings.

  Batches have the training batch size (the last one padded), so nothing new is compiled.
  """
  totals: dict[str, list[float]] = {"score": [], "kl": [], "length": [], "gold": []}
  for start, real, take in padded_batches(len(prompts), batch_size):
    part = prompts.take(take)
    gen = host_generation(
      fns.sample(
        policy_params,
        frozen,
        jax.random.key(seed + start),
        put_rows(part.ids, placement),
        put_rows(part.mask, placement),
      )
    )
    full_ids = put_rows(np.concatenate([part.ids, gen.tokens], 1), placement)
    full_mask = put_rows(np.concatenate([part.mask, gen.mask.astype(np.int32)], 1), placement)
    scores, kl = (shd.to_host(x) for x in fns.evaluate(policy_params, frozen, full_ids, full_mask))
    if scorer.fn or gold:  # the real rows' texts, for the functions
      texts = decode_responses(tokenizer, gen.tokens[:real], gen.mask[:real])
      reals = part.take(np.arange(real))
    if scorer.fn is not None:
      parts = shared_score_parts(scorer.fn, reals, texts, name=scorer.fn_name)
      scores = summed(scorer.fn, parts, name=scorer.fn_name)
      if isinstance(scorer.fn, RewardSum):  # each function's mean too, before its weight
        for name, column in zip(scorer.fn.names, parts.T, strict=True):
          totals.setdefault(f"scores/{name}", []).extend(column.tolist())
    totals["score"] += np.asarray(scores)[:real].tolist()
    totals["kl"] += kl[:real].tolist()
    totals["length"] += gen.mask.sum(-1)[:real].tolist()
    if gold is not None:
      totals["gold"] += shared_scores(gold, reals, texts, name="gold scorer").tolist()
  return {k: float(np.mean(v)) for k, v in totals.items() if v}


def sample_rows(tokenizer, batch: Prompts, gen, texts, per_sample, golds, k: int) -> list[dict]:
  """The first ``k`` samples: prompt, response, score (with several reward functions each one's
  score before its weight, ``scores/<name>``, of ``per_sample``'s ``sample/scores/<name>``), gold
  score (of ``golds``: the batch's, or None) and KL to the reference: the sample command's order."""
  texts = texts or decode_responses(tokenizer, gen.tokens, gen.mask)
  k = min(k, len(texts))
  rows = []
  for i in range(k):
    row = {"prompt": batch.texts[i], "response": texts[i]}
    row["score"] = float(per_sample["sample/score"][i])
    for key, values in per_sample.items():
      if key.startswith("sample/scores/"):
        row[key.removeprefix("sample/")] = float(values[i])
    if golds is not None:
      row["gold"] = float(golds[i])
    row["kl"] = float(per_sample["sample/kl"][i])
    rows.append(row)
  return rows
