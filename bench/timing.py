"""Side-by-side timing: contenders run alternately in one process, medians and ratios reported."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternate(
  contenders: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
  """Runs each contender ``warmup`` times, then all of them in turn ``repeats`` times.

  Alternating spreads machine noise (other processes, frequency changes) over every contender
  alike, so the ratio of medians is meaningful even where absolute times are not.
  """
  for fn in contenders.values():
    for _ in range(warmup):
      fn()
  times: dict[str, list[float]] = {name: [] for name in contenders}
  for _ in range(repeats):
    for name, fn in contenders.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return times


def summary(times: list[float]) -> str:
  return (
    f"median {statistics.median(times) * 1e3:.1f} ms "
    f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}, n={len(times)})"
  )
