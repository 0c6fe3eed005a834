"""Where a traced program's time goes, op by op, as text: a ``jax.profiler`` trace read back with
``jax.profiler.ProfileData`` and summed per kernel (GPU: each device line, e.g. its streams and
"XLA Ops"; CPU: the XLA ops of the host threads, which XLA:CPU reports only under
``XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true``).

A device run writes the table (a few kB) instead of the trace (MBs, and the device tool brings
back at most 8 files): ``bench/accelerator.py --profile-out FILE`` traces the decode loop.

  python bench/profile_ops.py TRACE_DIR          # a trace written by jax.profiler.trace
"""

from __future__ import annotations

import collections
import glob
import re
import sys

from jax.profiler import ProfileData


def family(name: str) -> str:
  """An op's or kernel's name without its instance number: ``loop_add_fusion.12`` → ``loop_add_
  fusion``; a kernel's template arguments are dropped."""
  return re.sub(r"[._]?\d+$", "", name.split("<")[0].split("(")[0])


def summarize(trace_dir: str, *, top: int = 30, title: str = "") -> str:
  """The table of the trace under ``trace_dir``: per device line (or host ops), its events'
  total time and the ``top`` op families by time, with counts and means."""
  paths = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
  if not paths:
    return f"no trace under {trace_dir}\n"
  data = ProfileData.from_file(paths[-1])
  out = [title] if title else []
  for plane in data.planes:
    device = plane.name.startswith("/device:")
    for line in plane.lines:
      times: dict[str, list[float]] = collections.defaultdict(list)
      for event in line.events:
        if not device and "hlo_op" not in dict(event.stats):
          continue  # the host's own work (Python, thread pools): not an XLA op
        times[family(event.name)].append(event.duration_ns)
      total = sum(sum(v) for v in times.values())
      if not total:
        continue
      count = sum(len(v) for v in times.values())
      out.append(f"\n{plane.name} / {line.name}: {count} events, {total / 1e6:.3f} ms")
      out.append(f"  {'ms':>9} {'share':>6} {'count':>7} {'mean µs':>9}  op family")
      ranked = sorted(times.items(), key=lambda kv: -sum(kv[1]))
      for name, durations in ranked[:top]:
        t = sum(durations)
        out.append(
          f"  {t / 1e6:9.3f} {t / total:6.1%} {len(durations):7d} "
          f"{t / len(durations) / 1e3:9.2f}  {name[:110]}"
        )
      if len(ranked) > top:
        rest = sum(sum(v) for _, v in ranked[top:])
        out.append(f"  {rest / 1e6:9.3f} {rest / total:6.1%}  (the {len(ranked) - top} others)")
  return "\n".join(out) + "\n"


if __name__ == "__main__":
  if len(sys.argv) != 2:
    raise SystemExit(__doc__)
  print(summarize(sys.argv[1]), end="")
