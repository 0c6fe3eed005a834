"""Which rows each step reads: an endless stream of per-epoch shuffles (a pure function of seed
and step, so a resumed run reads the batches the uninterrupted one would), and the held-out
split."""

from __future__ import annotations

import numpy as np


def batch_indices(n: int, batch_size: int, step: int, *, seed: int) -> np.ndarray:
  """Row indices of batch ``step`` in an endless stream of per-epoch shuffles of ``range(n)``.

  A pure function of its arguments: the data cursor of a run is its step, so a resumed run reads
  exactly the batches the uninterrupted one would have. A batch that straddles two epochs takes
  the end of one shuffle and the start of the next, so it may hold a row twice.
  """
  if n < 1 or batch_size < 1:
    raise ValueError(f"need n ≥ 1 and batch_size ≥ 1, got {n}, {batch_size}")
  start = step * batch_size
  out = []
  while len(out) < batch_size:
    epoch, offset = divmod(start + len(out), n)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    out.extend(order[offset : offset + batch_size - len(out)].tolist())
  return np.asarray(out, np.int64)


def split_holdout(
  n: int, fraction: float, *, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) row indices; at least one held-out row when ``fraction > 0``, never all.

  ``groups``: a group id per row (``data.Sequences.prompt_groups``: rows of one prompt). Whole
  groups are held out, drawn in a seeded order until ``fraction`` of the rows are, passing over a
  group that would overshoot by more than it fills (so at most twice the rows asked) or leave no
  training row; a prompt's other responses are then not trained on while its held-out ones
  measure generalisation. With every row its own group (or none given) the split is the row
  split. Groups too large for that (a few prompts over all rows): by rows as well.
  """
  k = min(max(round(n * fraction), 1 if fraction > 0 else 0), n - 1)
  if groups is None or k == 0:
    groups = np.arange(n)
  ids, groups = np.unique(groups, return_inverse=True)
  order = np.random.default_rng([seed, 7919]).permutation(len(ids))
  if len(ids) == n:  # one row per group: the row split (np.unique sorted them as rows)
    return np.sort(order[k:]), np.sort(order[:k])
  sizes = np.bincount(groups, minlength=len(ids))
  held, count = [], 0
  for g in order:
    if count >= k:
      break
    if count + sizes[g] < n and count + sizes[g] - k <= k - count:
      held.append(g)
      count += sizes[g]
  if not held:  # no prompt small enough
    return split_holdout(n, fraction, seed=seed)
  is_held = np.isin(groups, held)
  return np.flatnonzero(~is_held), np.flatnonzero(is_held)


def holdout_by_prompt(seqs, fraction: float, *, seed: int, what: str | None = None) -> tuple:
  """``split_holdout`` of ``seqs`` (``data.Sequences``) grouped by prompt; a note when its
  prompts are too few and large to hold out whole (``what``: the data, for the note; None:
  none)."""
  groups = seqs.prompt_groups()
  train, held = split_holdout(len(seqs), fraction, seed=seed, groups=groups)
  if what and len(held) and np.isin(groups[held], groups[train]).any():
    print(
      f"note: {what}: {len(np.unique(groups))} prompts over {len(seqs)} rows, too few to hold "
      "out whole ones: held out by rows (held-out metrics include prompts trained on)"
    )
  return train, held
