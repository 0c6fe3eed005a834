"""The commands beside the experiment runner: ``ppo-jax export``, ``ppo-jax sample`` and
``ppo-jax rm-eval``, each an argparse front to a library function (``export.export_policy``,
``inference.sample_file``, ``rm_eval.evaluate_pairs``). Errors are one line: exit status 2 for
bad flags, 1 for bad input.
"""

from __future__ import annotations

import argparse
import signal
import sys

from ppo_jax import data, preemption
from ppo_jax.main import _one_line, enable_compilation_cache


def export(argv: list[str]) -> int:
  """`ppo-jax export --workdir DIR [--stage ppo|dpo] [--step N] --out DIR`: a checkpointed policy
  as a Hugging Face folder."""
  p = argparse.ArgumentParser(prog="ppo-jax export", description=export.__doc__)
  p.add_argument(
    "--workdir", required=True, help="a ppo_jax workdir with checkpoints/ or dpo_checkpoints/"
  )
  p.add_argument(
    "--stage",
    choices=("ppo", "dpo"),
    default=None,
    help="whose checkpoints: PPO's (checkpoints/) or DPO's (default: the one the workdir holds)",
  )
  p.add_argument("--step", type=_step, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--out", required=True, help="output folder (Hugging Face layout)")

  def run(workdir, out, step, stage):
    from ppo_jax.export import export_policy

    done = export_policy(workdir, out, step=step, stage=stage)
    print(f"wrote the policy of step {done} to {out}")

  return run_command(p, run, argv)


def _mesh(text: str) -> tuple[int, ...]:
  try:
    shape = tuple(int(part) for part in text.split(","))
  except ValueError:
    shape = ()
  if len(shape) != 3:
    raise argparse.ArgumentTypeError(f"{text!r} is not DATA,FSDP,TENSOR (three integers)")
  return shape


def _step(text: str) -> int:
  if not text.isdigit():
    raise argparse.ArgumentTypeError(f"{text!r} is not a step number")
  return int(text)


def rm_eval(argv: list[str]) -> int:
  """``ppo-jax rm-eval --reward-model=DIR --pairs=FILE [--out=FILE] [...]``."""
  p = argparse.ArgumentParser(
    prog="ppo-jax rm-eval",
    description="A reward model's accuracy, margin and Bradley-Terry loss on a preference file.",
  )
  p.add_argument("--reward-model", required=True, help="*ForSequenceClassification folder")
  p.add_argument("--pairs", required=True, help="JSONL preference file (any accepted form)")
  p.add_argument("--out", help="JSONL file for per-pair scores (must not exist)")
  p.add_argument("--tokenizer", help="tokenizer folder (default: --reward-model)")
  p.add_argument("--batch-size", type=count, default=16, help="pairs per forward (16)")
  run = "default: as its run's ppo_jax_stage.json says, else"
  p.add_argument("--max-prompt-len", type=count, help=f"{run} the positions left")
  p.add_argument("--max-response-len", type=count, help=f"{run} half the positions")
  add_prompt_flags(p, run=run)
  from ppo_jax.rm_eval import evaluate_pairs

  return run_command(p, evaluate_pairs, argv)


def sample(argv: list[str]) -> int:
  """``ppo-jax sample --model=DIR --prompts=FILE --out=FILE [...]``: ``sample_file`` from the
  command line."""
  p = argparse.ArgumentParser(
    prog="ppo-jax sample",
    description="Sample a policy on a prompts file; write the responses (scored, with a reward "
    "model or function) as JSONL and print their mean score, and the best-of-n score with --n.",
  )
  p.add_argument("--model", required=True, help="causal-LM folder (WORKDIR/policy, an export)")
  p.add_argument("--prompts", required=True, help="JSONL prompts (or SFT or preference) file")
  p.add_argument("--out", required=True, help="JSONL file to write (must not exist)")
  p.add_argument("--n", type=count, default=1, help="responses per prompt (default 1)")
  p.add_argument(
    "--max-new-tokens",
    type=count,
    help="response length cap (the model's generation_config.json max_new_tokens, else 64; at "
    "most half the positions of model and reward model)",
  )
  p.add_argument("--reward-model", help="*ForSequenceClassification folder to score with")
  p.add_argument(
    "--reward-fn", help="package.module:function to score with (several: a:f,b:g, summed)"
  )
  p.add_argument(
    "--reward-weights", help="one weight per --reward-fn function: --reward-weights=1,-0.5"
  )
  p.add_argument("--gold-fn", help="package.module:function that judges (best-of-n picks by score)")
  p.add_argument(
    "--ref-model",
    help="causal-LM folder (WORKDIR/sft, say) to measure each response's KL to (k1, in nats)",
  )
  p.add_argument("--tokenizer", help="tokenizer folder (default: --model)")
  p.add_argument("--temperature", type=float, help="default: generation_config.json's, else 1")
  p.add_argument("--top-p", type=float, help="default: generation_config.json's, else 1")
  p.add_argument("--top-k", type=int, help="default: generation_config.json's, else 0 (all)")
  p.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
  p.add_argument("--batch-size", type=count, default=16, help="rows per sampler call (16)")
  p.add_argument("--max-prompt-len", type=count, help="default: the model's positions left")
  add_prompt_flags(p)
  p.add_argument(
    "--seed", type=int, default=0, help="the same seed samples the same file, any batch size (0)"
  )
  from ppo_jax.inference import sample_file

  return run_command(p, sample_file, argv)


def add_prompt_flags(p, *, run: str | None = None) -> None:
  """The flags of how prompts are read and the numerics, shared by the commands of files.
  ``run``: where the defaults are the run's (rm-eval), what the help says of them; the flags are
  then None unless given."""
  p.add_argument(
    "--prompt-overflow",
    choices=data.OVERFLOW,
    default=None if run else "error",
    help=f"{run} error" if run else "default: error",
  )
  p.add_argument(
    "--chat-template",
    action=argparse.BooleanOptionalAction,
    default=None if run else False,
    help=f"prompts in the chat template ({run or 'default:'} plain text)",
  )
  with_template = f"{run} none" if run else "with --chat-template"
  p.add_argument("--system-prompt", help=f"a system turn first ({with_template})")
  p.add_argument("--chat-template-kwargs", help=f"a JSON object ({with_template})")
  p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
  p.add_argument(
    "--mesh",
    type=_mesh,
    help="devices as --mesh=DATA,FSDP,TENSOR, one -1 for the rest (default: all on data; 1,1,1: "
    "one device)",
  )


# The config fields data.py names in its errors, each set here by the flag of its name (longest
# first: one name starts another).
FLAG_FIELDS = (
  "chat_template_kwargs", "chat_template", "system_prompt", "max_prompt_len",
  "max_response_len", "prompt_overflow",
)  # fmt: skip


def count(text: str) -> int:
  """An argparse type: an int ≥ 1 (a bad one is a flag error, exit status 2)."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
  return value


def _negative_lists_joined(argv: list[str]) -> list[str]:
  """``--reward-weights -0.5,1`` as ``--reward-weights=-0.5,1`` (and ``--mesh -1,1,1``): argparse
  reads a value that starts with ``-`` (and is no plain number) as a flag."""
  out, i = [], 0
  while i < len(argv):
    if (
      argv[i] in ("--reward-weights", "--mesh")
      and i + 1 < len(argv)
      and argv[i + 1].startswith("-")
    ):
      out.append(f"{argv[i]}={argv[i + 1]}")
      i += 2
    else:
      out.append(argv[i])
      i += 1
  return out


def run_command(parser, fn, argv: list[str]) -> int:
  """``fn(**flags)``; errors are one line, exit status 2 for bad flags and 1 for bad input."""
  from ppo_jax.rewards import RewardError

  def one_line(message):  # argparse's own error prints the usage first
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)

  parser.error = one_line
  parser.allow_abbrev = False  # --temp is no flag: a typo, not --temperature
  argv = _negative_lists_joined(argv)
  try:
    _check_flag_names(parser, argv)
    args = parser.parse_args(argv)
    _check_together(vars(args), parser.error)
  except SystemExit as e:  # --help, or a bad flag
    return int(e.code or 0)
  enable_compilation_cache()
  # SIGTERM (a scheduler's stop) as Ctrl-C: an exception where the command is; what was written
  # is kept and said. Remembered too, for when Python discards the exception (command_stop).
  previous = preemption.install(preemption.command_stop)
  preemption.pending_stop()  # none from an earlier command of this process
  try:
    if preemption.EARLY:  # came as the command started, after its last look
      return _stopped(parser.prog, preemption.EARLY.pop(), "interrupted by {by} while starting")
    fn(**vars(args))
    if stop := preemption.pending_stop():  # came, was discarded, and the command finished
      return _stopped(parser.prog, stop, "{by} came as it finished: its output is whole")
  except KeyboardInterrupt as e:  # Ctrl-C: no traceback (what was written is said by the command)
    preemption.pending_stop()
    term = isinstance(e, preemption.Terminated)
    return _stopped(parser.prog, signal.SIGTERM if term else signal.SIGINT, "interrupted by {by}")
  except (ValueError, OSError, RewardError) as e:
    message = _one_line(e)
    message = message.replace("data.chat_template=True", "--chat-template")  # a switch here
    for field in FLAG_FIELDS:
      message = message.replace(f"data.{field}", "--" + field.replace("_", "-"))
    for field, flag in (("mesh.shape", "--mesh"), ("ppo.max_new_tokens", "--max-new-tokens")):
      message = message.replace(field, flag)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 1
  finally:
    preemption.restore(previous)
  return 0


def _stopped(prog: str, signum: int, line: str) -> int:
  """Says ``line`` (``{by}``: SIGTERM or Ctrl-C) and gives the exit status: 143 for SIGTERM,
  130 for Ctrl-C."""
  term = signum == signal.SIGTERM
  print(f"{prog}: " + line.format(by="SIGTERM" if term else "Ctrl-C"), file=sys.stderr)
  return 143 if term else 130


def _check_flag_names(parser, argv: list[str]) -> None:
  """Refuses an unknown ``--flag`` first, naming the nearest known one (argparse would first
  say that a required flag is missing: ``--outt`` for ``--out``)."""
  import difflib

  known = list(parser._option_string_actions)
  for arg in argv:
    if arg == "--":
      return
    name = arg.split("=", 1)[0]
    if name.startswith("--") and name not in known:
      # An abbreviation's flags first (--temp: --temperature), else the nearest spelling.
      near = [k for k in known if k.startswith(name)] or difflib.get_close_matches(name, known, 1)
      hint = f"; did you mean {' or '.join(near)}?" if near else ""
      parser.error(f"unknown flag {name}{hint}")


def _check_together(flags: dict, error) -> None:
  """Refuses flags that would be ignored: chat flags without --chat-template, sampling
  settings with --greedy."""
  if flags.get("chat_template", True) is False:  # None: the run's, checked once read
    for name in ("system_prompt", "chat_template_kwargs"):
      if flags.get(name) is not None:
        flag = "--" + name.replace("_", "-")
        error(f"{flag} needs --chat-template (without it prompts are read as plain text)")
  if flags.get("greedy"):
    given = [
      f"--{n.replace('_', '-')}"
      for n in ("temperature", "top_p", "top_k")
      if flags.get(n) is not None
    ]
    if given:
      error(f"--greedy takes the most likely token: {', '.join(given)} would not apply")
