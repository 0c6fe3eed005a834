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


def split_holdout(n: int, fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) row indices; at least one held-out row when ``fraction > 0``."""
  order = np.random.default_rng([seed, 7919]).permutation(n)
  k = min(max(round(n * fraction), 1 if fraction > 0 else 0), n - 1)
  return np.sort(order[k:]), np.sort(order[:k])
