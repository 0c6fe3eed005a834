"""The default experiment over several seeds: the README's results table and figure.

  python bench/default_seeds.py --runs runs/seeds [--seeds 0 1 2]

Runs ``experiments/default.py`` once per seed (a workdir that already holds a finished run is
reused), then prints a Markdown table of gold score, reward-model score and KL before and after PPO,
and writes ``docs/default_seeds.png`` (gold score and KL per PPO iteration).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parent.parent


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--runs", default="runs/seeds")
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--png", default=str(ROOT / "docs" / "default_seeds.png"))
  args = ap.parse_args()
  runs = pathlib.Path(args.runs)
  for seed in args.seeds:
    workdir = runs / f"seed{seed}"
    if not (workdir / "summary.json").exists():
      subprocess.run(
        [
          sys.executable,
          "-m",
          "ppo_jax.main",
          f"--config={ROOT / 'experiments' / 'default.py'}",
          f"--workdir={workdir}",
          f"--config.seed={seed}",
          "--config.log.progress=False",
        ],
        check=True,
      )

  print(
    "| seed | gold before → after | RM score before → after | KL after (nats) | RM held-out "
    "accuracy | seconds |"
  )
  print("|---|---|---|---|---|---|")
  summaries, curves = [], []
  for seed in args.seeds:
    workdir = runs / f"seed{seed}"
    s = json.loads((workdir / "summary.json").read_text())
    summaries.append(s)
    b, a = s["before"], s["after"]
    accuracy = s["rm_eval"].get("accuracy")  # none from a resumed run of an older ppo_jax
    print(
      f"| {seed} | {b['gold']:.2f} → {a['gold']:.2f} | {b['score']:.2f} → {a['score']:.2f} | "
      f"{a['kl']:.2f} | {'n/a' if accuracy is None else f'{accuracy:.3f}'} | "
      f"{s['seconds']:.0f} |"
    )
    curves.append(
      [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().split("\n") if line]
    )
  mean = lambda k, side: sum(s[side][k] for s in summaries) / len(summaries)
  print(
    f"| mean | {mean('gold', 'before'):.2f} → {mean('gold', 'after'):.2f} | "
    f"{mean('score', 'before'):.2f} → {mean('score', 'after'):.2f} | {mean('kl', 'after'):.2f} "
    f"| | |"
  )

  from matplotlib.figure import Figure

  fig = Figure(figsize=(10, 3.2))
  ax_g, ax_k = fig.subplots(1, 2)
  for seed, rows in zip(args.seeds, curves, strict=True):
    steps = [r["step"] for r in rows]
    ax_g.plot(steps, [r["gold/score"] for r in rows], lw=1.2, label=f"seed {seed}")
    ax_k.plot(steps, [r["objective/kl"] for r in rows], lw=1.2, label=f"seed {seed}")
  ax_g.set(xlabel="PPO iteration", ylabel="gold score", title="gold score of the sampled reviews")
  ax_k.set(xlabel="PPO iteration", ylabel="nats / review", title="KL to the SFT policy")
  for ax in (ax_g, ax_k):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(args.png, dpi=100)
  print(f"wrote {args.png}")


if __name__ == "__main__":
  main()
