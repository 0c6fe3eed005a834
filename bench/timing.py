"""Side-by-side timing: contenders run alternately in one process, medians and ratios reported."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


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


def matmul_peak(
  n: int = 2048, dtype: str = "float32", repeats: int = 5, *, batch: int = 1
) -> float:
  """FLOP/s of a jitted ``n³`` matmul in ``dtype``: the device's practical peak.

  ``batch`` > 1 multiplies that many pairs of matrices in one call, so the launch and the host's
  wait, which one 8192³ bf16 product on an H200 (about 1.5 ms) does not hide, are paid once.
  """
  a = jax.random.normal(jax.random.key(0), (batch, n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (batch, n, n), dtype)
  f = jax.jit(lambda x, y: jnp.matmul(x, y))
  times = alternate({"matmul": lambda: f(a, b).block_until_ready()}, repeats=repeats)
  return 2 * batch * n**3 / min(times["matmul"])


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
  """Bytes/s of a jitted ``x + 1`` over ``nbytes`` of bfloat16 (each byte read and written
  once): the device memory's practical bandwidth."""
  x = jnp.zeros((nbytes // 2,), jnp.bfloat16)
  f = jax.jit(lambda y: y + 1)
  times = alternate({"copy": lambda: f(x).block_until_ready()}, repeats=repeats)
  return 2 * nbytes / min(times["copy"])


def read_bandwidth(nbytes: int, repeats: int = 5) -> float:
  """Bytes/s of a jitted float32 sum over ``nbytes`` of bfloat16 (each byte read once, nothing
  written): the roofline of a read-bound kernel such as a decode step, which reads every weight."""
  x = jnp.ones((nbytes // 2,), jnp.bfloat16)
  f = jax.jit(lambda y: jnp.sum(y, dtype=jnp.float32))
  times = alternate({"read": lambda: f(x).block_until_ready()}, repeats=repeats)
  return nbytes / min(times["read"])
