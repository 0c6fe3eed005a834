"""PPO, GRPO, RLOO and DPO on the default experiment's task over several seeds: table, figure.

  python bench/compare_algos.py --runs runs/algos [--seeds 0 1 2] [--algos ppo grpo rloo]
      [--variant 'ppo_wu5=ppo:--config.ppo.critic_warmup=5' ...]

Per seed, ``experiments/default.py`` runs the whole pipeline (SFT, reward model, PPO); GRPO and
RLOO (``experiments/grpo.py``, ``experiments/rloo.py``) then start from copies of that seed's SFT
policy and reward model, so only the RL stage differs; DPO (``experiments/dpo.py``) starts from
the SFT policy and trains on the reward model's preference pairs instead. Every RL algorithm sees
64 responses per iteration for 100 iterations (PPO: 64 prompts × 1; GRPO and RLOO: 16 prompts ×
4). ``--variant LABEL=ALGO:FLAGS`` adds ALGO with extra config flags (space-separated), from the
same SFT policy and reward model, as a row and curves of its own. A workdir holding a finished run
is reused. Prints a Markdown table (held-out gold score and
KL before and after, seconds of the last stage's training) and writes ``docs/algos.png`` (gold
score and KL per iteration of the RL algorithms, mean over seeds, and gold against KL along the
runs).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).parent.parent
EXPERIMENTS = {"ppo": "default.py", "grpo": "grpo.py", "rloo": "rloo.py", "dpo": "dpo.py"}


def run(
  algo: str, seed: int, workdir: pathlib.Path, runs: pathlib.Path, flags: list[str] = ()
) -> None:
  if (workdir / "summary.json").exists():
    return
  if algo != "ppo" or flags:  # the same SFT policy and reward model as PPO's run of this seed
    run("ppo", seed, runs / f"seed{seed}" / "ppo", runs)
    for stage in ("sft",) if algo == "dpo" else ("sft", "reward_model"):
      if not (workdir / stage).exists():
        shutil.copytree(runs / f"seed{seed}" / "ppo" / stage, workdir / stage)
  subprocess.run(
    [
      sys.executable,
      "-m",
      "ppo_jax.main",
      f"--config={ROOT / 'experiments' / EXPERIMENTS[algo]}",
      f"--workdir={workdir}",
      f"--config.seed={seed}",
      "--config.log.progress=False",
      *flags,
    ],
    check=True,
  )


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--runs", default="runs/algos")
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--algos", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
  ap.add_argument("--variant", action="append", default=[], metavar="LABEL=ALGO:FLAGS")
  ap.add_argument("--png", default=str(ROOT / "docs" / "algos.png"))
  args = ap.parse_args()
  runs = pathlib.Path(args.runs)
  entries = [(algo, algo, []) for algo in args.algos]  # (label, algorithm, extra flags)
  for v in args.variant:
    label, _, rest = v.partition("=")
    algo, _, flags = rest.partition(":")
    if not label or algo not in EXPERIMENTS or label in EXPERIMENTS:
      ap.error(f"--variant {v!r}: expected LABEL=ALGO:FLAGS with ALGO in {', '.join(EXPERIMENTS)}")
    entries.append((label, algo, flags.split()))
  curves: dict[str, list[list[dict]]] = {}
  gains: dict[str, list[float]] = {}
  print(
    "| algorithm | gold before → after (per seed) | mean gold gain | KL after (nats) | RL seconds |"
  )
  print("|---|---|---|---|---|")
  for label, algo, flags in entries:
    summaries, curves[label] = [], []
    for seed in args.seeds:
      workdir = runs / f"seed{seed}" / label
      run(algo, seed, workdir, runs, flags)
      summaries.append(json.loads((workdir / "summary.json").read_text()))
      path = workdir / "metrics.jsonl"  # RL algorithms only
      lines = path.read_text().splitlines() if path.exists() else []
      curves[label].append([json.loads(line) for line in lines if line])
    per_seed = ", ".join(f"{s['before']['gold']:.2f} → {s['after']['gold']:.2f}" for s in summaries)
    gains[label] = [s["after"]["gold"] - s["before"]["gold"] for s in summaries]
    gain = statistics.mean(gains[label])
    kl = statistics.mean(s["after"]["kl"] for s in summaries)
    secs = statistics.mean(
      s["dpo_eval"]["train_seconds"] if algo == "dpo" else sum(r["time/iteration"] for r in rows)
      for s, rows in zip(summaries, curves[label], strict=True)
    )
    print(f"| {label.upper()} | {per_seed} | {gain:+.2f} | {kl:.2f} | {secs:.0f} |", flush=True)

  from matplotlib.figure import Figure

  fig = Figure(figsize=(18, 3.4))
  ax_g, ax_k, ax_f, ax_b = fig.subplots(1, 4)
  for i, g in enumerate(gains.values()):  # every algorithm, DPO included
    ax_b.bar(i, statistics.mean(g), color="0.8")
    ax_b.plot([i] * len(g), g, "o", color="C3", ms=4)
  ax_b.set_xticks(range(len(gains)), [a.upper() for a in gains])
  ax_b.set(ylabel="gold after − before", title="gold gain (bar: mean; dots: seeds)")
  for algo, runs_rows in curves.items():
    if not runs_rows[0]:
      continue
    steps = [r["step"] for r in runs_rows[0]]
    mean = {
      key: [statistics.mean(rows[i][key] for rows in runs_rows) for i in range(len(steps))]
      for key in ("gold/score", "objective/kl")
    }
    for ax, key in ((ax_g, "gold/score"), (ax_k, "objective/kl")):
      ax.plot(steps, mean[key], lw=1.2, label=algo.upper())
    # Gold against KL along the run: a 5-point moving average of the seed means (the RL curves
    # log every iteration; DPO's held-out evaluations are few and plotted as they are).
    w = 5 if len(steps) >= 20 else 1
    smooth = lambda v, w=w: np.convolve(v, np.ones(w) / w, "valid")
    ax_f.plot(
      smooth(mean["objective/kl"]),
      smooth(mean["gold/score"]),
      lw=1.2,
      marker="." if w == 1 else None,
      label=algo.upper(),
    )
  ax_g.set(xlabel="iteration", ylabel="gold score", title="gold score (mean of seeds)")
  ax_k.set(xlabel="iteration", ylabel="nats / review", title="KL to the SFT policy")
  ax_f.set(xlabel="KL to the SFT policy (nats / review)", ylabel="gold score", title="gold for KL")
  for ax in (ax_g, ax_k, ax_f):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  ax_b.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(args.png, dpi=100)
  print(f"wrote {args.png}")


if __name__ == "__main__":
  main()
