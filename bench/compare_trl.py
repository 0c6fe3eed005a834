"""ppo_jax against TRL 1.12's PPOTrainer on the reference workload, alternating in one run.

Each round runs ``bench/trl_workload.py`` (in TRL's own virtual env) and
``bench/ppo_workload.py`` (in this one) as fresh processes, in alternating order, and reads the
median seconds per iteration from their last lines. Machine noise falls on both alike; the
ratio of the medians over rounds is what to quote. Variants: the default workload (GPT-2 L4 d256)
and the bigger one (L8 d512, 8 heads).

  python -m venv .venv-trl && .venv-trl/bin/pip install torch==2.13.0 trl==1.12.0   # once
  python bench/compare_trl.py [--rounds 3] [--iterations 10] [--trl-python .venv-trl/bin/python]
"""

from __future__ import annotations

import argparse
import pathlib
import re
import statistics
import subprocess
import sys

HERE = pathlib.Path(__file__).parent
VARIANTS = {
  "GPT-2 L4 d256 (default)": [],
  "GPT-2 L8 d512": ["--layers", "8", "--width", "512", "--heads", "8"],
}


def run(python: str, script: str, args: list[str]) -> float:
  proc = subprocess.run(
    [python, str(HERE / script), *args], capture_output=True, text=True, check=False
  )
  last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
  match = re.search(r"iter_s=([0-9.]+)", last)
  if proc.returncode or not match:
    raise SystemExit(f"{script} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  print(f"  {last}", flush=True)
  return float(match.group(1))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--iterations", type=int, default=10, help="timed iterations per process")
  ap.add_argument("--trl-python", default=str(HERE.parent / ".venv-trl" / "bin" / "python"))
  ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
  args = ap.parse_args()
  if not pathlib.Path(args.trl_python).exists():
    raise SystemExit(f"no TRL interpreter at {args.trl_python}: create it as the docstring says")
  rows = []
  for name in args.variants.split(","):
    extra = [*VARIANTS[name], "--iterations", str(args.iterations)]
    times = {"trl": [], "ppo_jax": []}
    for r in range(args.rounds):
      print(f"{name}, round {r + 1}/{args.rounds}", flush=True)
      order = ["trl", "ppo_jax"] if r % 2 == 0 else ["ppo_jax", "trl"]
      for who in order:
        if who == "trl":
          times[who].append(run(args.trl_python, "trl_workload.py", extra))
        else:
          times[who].append(run(sys.executable, "ppo_workload.py", [*extra, "--no-phases"]))
    trl, ours = statistics.median(times["trl"]), statistics.median(times["ppo_jax"])
    rows.append((name, trl, ours))
  print("\n| workload | TRL 1.12 s/iter | ppo_jax s/iter | ppo_jax speed-up |")
  print("|---|---|---|---|")
  for name, trl, ours in rows:
    print(f"| {name} | {trl:.3f} | {ours:.3f} | {trl / ours:.2f}× |")


if __name__ == "__main__":
  main()
