"""What a run leaves in its workdir: metrics.jsonl, TensorBoard events, sample tables, PNG plots,
and on the terminal a progress bar and the closing summary."""

from __future__ import annotations

import fnmatch
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax

PLOTTED = (
  "gold/score",
  "objective/scores",
  "scores/*",  # each reward function's, with several
  "objective/kl",
  "objective/kl_coef",
  "objective/rlhf_reward",
  "policy/entropy_avg",
  "policy/clipfrac_avg",
  "policy/approxkl_avg",
  "loss/value_avg",
  "val/var_explained",
  "response/length",
  "response/eos_rate",
)


class MetricsWriter:
  """One JSON object per line (``{"step": …, name: value}``) plus TensorBoard scalars.

  With several processes only the first writes; the others' writers do nothing.
  """

  def __init__(
    self,
    path: pathlib.Path,
    *,
    tensorboard_dir: pathlib.Path | None,
    prefix: str = "",
    resume_step: int = 0,
  ):
    """Appends to ``path``; rows past ``resume_step`` (written by a run that stopped after its
    last checkpoint) are dropped first, from the file and from TensorBoard."""
    self.path = path
    self.prefix = prefix
    self._file = self._tb = None
    if jax.process_index() != 0:
      return
    path.parent.mkdir(parents=True, exist_ok=True)
    truncate_jsonl(path, resume_step)
    self._file = path.open("a")
    self._tb = None
    if tensorboard_dir is not None:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(tensorboard_dir), purge_step=resume_step + 1)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if self._file is None:
      return
    self._file.write(json_line({"step": int(step), **metrics}))
    self._file.flush()
    if self._tb is not None:
      for name, value in metrics.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(self.prefix + name, value, int(step))
      # Now, not every 2 min: a process that exits at once (a second Ctrl-C) keeps its events,
      # and a resume logs again only the steps after its checkpoint.
      self._tb.flush()

  def text(self, tag: str, markdown: str, step: int) -> None:
    if self._tb is not None:
      self._tb.add_text(self.prefix + tag, markdown, int(step))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def json_line(row: dict[str, Any]) -> str:
  """``row`` as a JSONL line; a non-finite float as its string ("nan", "inf"): JSON has no NaN,
  and the value stays visible rather than its key dropped."""
  jsonable = lambda v: str(v) if isinstance(v, float) and not math.isfinite(v) else v
  return json.dumps({k: jsonable(v) for k, v in row.items()}, ensure_ascii=False) + "\n"


def truncate_jsonl(path: pathlib.Path, max_step: int) -> None:
  """Keeps the rows of a JSONL log whose ``step`` is at most ``max_step``, and drops (with a note)
  lines that are not a row: one cut short when a full disk or a kill stopped its write. The file
  is replaced whole, never left half rewritten."""
  if not path.exists() or jax.process_index() != 0:
    return
  kept, bad = [], 0
  for line in path.read_text(errors="replace").splitlines():
    if not line.strip():
      continue
    try:
      step = json.loads(line)["step"]
      kept += [line] if step <= max_step else []
    except (ValueError, TypeError, KeyError):
      bad += 1
  if bad:
    print(f"note: {path}: dropped {bad} unreadable line{'s' * (bad > 1)} (a write cut short)")
  write_whole(path, "".join(r + "\n" for r in kept))


def write_whole(path: pathlib.Path, text: str | bytes) -> None:
  """Writes ``text`` to ``path`` whole or not at all (a hidden partial file, then renamed): a
  kill or a full disk mid-write leaves the old file, never half of the new one."""
  partial = path.with_name(f".{path.name}.partial")
  partial.write_bytes(text.encode() if isinstance(text, str) else text)
  os.replace(partial, path)


def read_metrics(path: pathlib.Path) -> list[dict[str, Any]]:
  with path.open() as f:
    return [json.loads(line) for line in f if line.strip()]


def samples_table(rows: Sequence[dict[str, Any]]) -> str:
  """A Markdown table of sample responses (prompt, response, score, KL, ...). A cell's ``|`` is
  escaped and its line breaks are ``<br>``: a row of the table stays one line."""
  if not rows:
    return ""
  cols = list(rows[0])

  def esc(v):
    text = f"{v:.3f}" if isinstance(v, float) else str(v)
    return "<br>".join(text.replace("|", "\\|").splitlines())

  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(esc(r[c]) for c in cols) + " |" for r in rows]
  return "\n".join(lines)


def write_samples(
  folder: pathlib.Path,
  step: int,
  rows: Sequence[dict[str, Any]],
  writer: MetricsWriter | None = None,
) -> None:
  """Appends to ``samples.jsonl`` and writes ``samples/step_NNNNNN.md`` (first process only)."""
  if jax.process_index() != 0:
    return
  folder.mkdir(parents=True, exist_ok=True)
  with (folder.parent / "samples.jsonl").open("a") as f:
    for r in rows:
      f.write(json_line({"step": int(step), **r}))
  table = samples_table(rows)
  (folder / f"step_{step:06d}.md").write_text(f"# Samples at step {step}\n\n{table}\n")
  if writer is not None:
    writer.text("samples", table, step)


def panels(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> list[str]:
  """The metrics of ``names`` (each a name or a pattern, ``scores/*``) that ``rows`` hold as
  numbers, two different ones at least (a constant curve says nothing), in ``names``' order."""
  found = dict.fromkeys(k for r in rows for k in r)
  names = [m for n in names for m in ([k for k in found if fnmatch.fnmatchcase(k, n)] or [n])]
  series = {n: [r[n] for r in rows if isinstance(r.get(n), (int, float))] for n in names}
  return [n for n, v in series.items() if len(set(v)) > 1]


def plot_metrics(
  metrics_path: pathlib.Path,
  out_png: pathlib.Path,
  *,
  names: Sequence[str] = PLOTTED,
  title: str = "",
) -> pathlib.Path | None:
  """A grid of curves (one panel per metric present; a name may be a pattern, ``scores/*``)
  saved as PNG."""
  if jax.process_index() != 0:
    return None
  # A standalone Figure: no pyplot, so the caller's matplotlib backend (a notebook's) is untouched.
  from matplotlib.figure import Figure

  rows = read_metrics(metrics_path)
  present = panels(rows, names)
  if not present:
    return None
  cols = 4
  nrows = math.ceil(len(present) / cols)
  fig = Figure(figsize=(4 * cols, 2.8 * nrows))
  axes = fig.subplots(nrows, cols, squeeze=False)
  for ax, name in zip(axes.flat, present, strict=False):
    pts = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
    ax.plot(*zip(*pts, strict=True), lw=1.2)
    ax.set_title(name, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(present) :]:
    ax.axis("off")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  out_png.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out_png, dpi=110)
  return out_png


# Each stage's metrics file, its plot and the curves in it ("metrics.jsonl": PLOTTED).
STAGE_PLOTS = (
  ("sft", "sft_metrics.jsonl", ("nll", "token_accuracy", "grad_norm")),
  ("rm", "rm_metrics.jsonl", ("loss", "accuracy", "margin", "score_mean", "grad_norm")),
  (
    "dpo",
    "dpo_metrics.jsonl",
    ("loss", "reward_margin", "accuracy", "reward_chosen", "reward_rejected", "grad_norm"),
  ),
)


def plot_stages(workdir: pathlib.Path, algo: str, *, stop_after: str = "") -> list[pathlib.Path]:
  """``plots/{sft,rm,dpo}.png`` of the stages this workdir holds metrics of, and the RL stage's
  ``plots/{algo}.png`` of ``metrics.jsonl`` (for DPO, ``dpo_eval.png``: its held-out
  evaluations): the PNGs written. ``stop_after`` ('sft', 'rm': the run's last stage): none of
  the stages after it (another run's, in the same workdir)."""
  workdir = pathlib.Path(workdir)
  rl = ("dpo_eval" if algo == "dpo" else algo, "metrics.jsonl", PLOTTED)
  plots = (*STAGE_PLOTS, rl)
  if stop_after:
    plots = plots[: 1 if stop_after == "sft" else 2]  # STAGE_PLOTS: sft, rm, then the RL stage's
  written = []
  for name, file, names in plots:
    if (workdir / file).is_file():
      title = f"{name.upper().replace('_EVAL', ' held-out')}, {workdir.name}"
      png = plot_metrics(
        workdir / file, workdir / "plots" / f"{name}.png", names=names, title=title
      )
      if png is None and jax.process_index() == 0:  # all NaN, one step, or nothing moved
        say(f"plots: no {name}.png: no curve in {workdir / file} has two different finite values")
      written.append(png)
  return [png for png in written if png]


def say(text: str) -> None:
  """Prints a line of its own while a progress bar may be on screen (``tqdm.write``: the bar is
  cleared, the line printed, the bar drawn again below it); a plain ``print`` otherwise."""
  from tqdm.auto import tqdm

  tqdm.write(text)
  sys.stdout.flush()


class LineProgress:
  """tqdm's ``update``/``set_postfix``/``close`` as whole lines on stderr, one at most every
  ``every`` seconds and one at the end: progress for a log file or a batch scheduler, where a
  bar's carriage returns pile up as one endless line. A line falls due in ``update`` and is
  printed by the ``set_postfix`` that follows (the callers' order: the step's own metrics), or
  by ``close``. ``initial``: the steps done before (a resumed stage's). The time left is paced by
  the steps after the first one trained here (the first one's compilation does not count)."""

  def __init__(
    self, total: int, desc: str, *, initial: int = 0, every: float = 30.0, file=None
  ) -> None:
    self.total, self.desc, self.every = total, desc, every
    self.file = file if file is not None else sys.stderr
    self.n, self.postfix, self.due, self.said = initial, "", False, False
    self.t0 = self.shown = time.perf_counter()
    self.pace: tuple[int, float] | None = None  # (steps, time) at the end of the first step

  def update(self, n: int = 1) -> None:
    self.n += n
    now = time.perf_counter()
    if self.pace is None:
      self.pace = (self.n, now)
    self.due |= bool(n) and (now - self.shown >= self.every or self.n >= self.total)

  def set_postfix(self, values: dict[str, Any]) -> None:
    self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())
    if self.due:
      self._say()

  def close(self) -> None:
    if self.due or (self.n and not self.said):  # the end, however short the work
      self._say()

  def _say(self) -> None:
    now = time.perf_counter()
    steps, since = self.pace or (0, self.t0)
    left = ""
    if self.n < self.total and self.n > steps:
      left = f", ~{(now - since) / (self.n - steps) * (self.total - self.n):.0f} s left"
    tail = f"; {self.postfix}" if self.postfix else ""
    print(f"{self.desc} {self.n}/{self.total}, {now - self.t0:.0f} s{left}{tail}", file=self.file)
    self.file.flush()
    self.shown, self.due, self.said = now, False, True


def progress_bar(total: int, desc: str, *, initial: int = 0, enabled: bool = True):
  """A tqdm bar on a terminal, ``LineProgress`` lines when stderr is a file or a pipe (a log, a
  batch job) or a terminal of no width (a pty nobody sized: tqdm would draw nothing there);
  disabled (and on every process but the first): a no-op object with the same methods.
  ``initial``: steps already done."""
  from tqdm.auto import tqdm

  enabled = enabled and jax.process_index() == 0  # one bar for the job, not one per host
  lines = not sys.stderr.isatty() or _columns(sys.stderr) == 0
  if enabled and lines and "ipykernel" not in sys.modules:  # not a notebook
    return LineProgress(total, desc, initial=initial)
  return tqdm(
    total=total, desc=desc, initial=initial, disable=not enabled, dynamic_ncols=True, leave=True
  )


def _columns(stream) -> int:
  """The width of the terminal ``stream`` writes to (0: unknown or unsized)."""
  try:
    return os.get_terminal_size(stream.fileno()).columns
  except (OSError, ValueError, AttributeError):
    return 0


def rollout_summary(rows: list[dict[str, float]]) -> dict[str, float]:
  """Score, gold score, KL and length averaged over some iterations' rollouts."""
  keys = (
    ("score", "objective/scores"),
    ("gold", "gold/score"),
    ("kl", "objective/kl"),
    ("length", "response/length"),
    *((m, m) for m in dict.fromkeys(k for r in rows for k in r if k.startswith("scores/"))),
  )
  out = {}
  for k, m in keys:
    # metrics.jsonl writes a non-finite value as a string ("nan"); a skipped iteration's is left out
    values = [float(r[m]) for r in rows if m in r]
    finite = [v for v in values if math.isfinite(v)]
    if values:
      out[k] = sum(finite) / len(finite) if finite else float("nan")
  return out


def print_summary(summary: dict[str, Any], *, this_invocation: bool = True) -> None:
  """The run's closing table: score, gold score, KL and length before and after the RL stage, or
  the stage a run stopped after (``stop_after``; ``this_invocation=False``: a summary an earlier
  invocation wrote)."""
  before, after = summary["before"], summary["after"]
  rows = [
    ("score (reward model or fn)", "score"),
    *((f"  {k}", k) for k in before if k.startswith("scores/")),  # each reward function's
    ("gold score", "gold"),
    ("KL to reference (nats/seq)", "kl"),
    ("response length", "length"),
  ]
  k = summary.get("rollouts_compared", 3)
  algo = summary.get("algo", "ppo").upper()
  # Held-out prompts: sampled before and after the RL stage; otherwise its own rollouts
  source, columns = "held-out prompts", (f"before {algo}", f"after {algo}")
  if not summary.get("held_out"):
    source, columns = f"{algo} rollouts", (f"first {k}", f"last {k}")
    if not after:
      source, columns = "the one rollout", (f"{algo} rollout", "")
  if stop := summary.get("stop_after"):
    stage = {"sft": "supervised fine-tuning", "rm": "the reward model"}[stop]
    print(f"stopped after {stage} (config.stop_after={stop!r}): no {algo} stage")
    if "nll" in (sft := summary.get("sft_eval", {})):
      print(f"SFT held-out nll: {sft['nll']:.4f}, token accuracy {sft['token_accuracy']:.3f}")
  elif any(key in before for _, key in rows):
    print(f"{source:30s} {columns[0]:>12s} {columns[1]:>12s}".rstrip())
  else:  # DPO samples nothing while it trains: its before/after are the held-out prompts'
    print(f"no before/after scores: {algo} samples no rollouts, and no prompts were held out to")
    print("evaluate it (data.eval_prompts)")
  for label, key in rows:
    if key in before:  # after: none from a run of one rollout
      then = f"{after[key]:12.4f}" if key in after else f"{'—':>12s}"
      print(f"{label:30s} {before[key]:12.4f} {then}")
  if "accuracy" in summary.get("rm_eval", {}):
    print(
      f"reward model held-out accuracy: {summary['rm_eval']['accuracy']:.3f}"
      + (
        f" (labeller agrees with gold on {summary['label_accuracy']:.3f} of the pairs gold ranks)"
        if "label_accuracy" in summary
        else ""
      )
    )
  which = "this invocation" if this_invocation else "the invocation that finished it"
  print(f"time of {which}: {summary['seconds']:.0f} s")  # a resumed run's: since the resume
