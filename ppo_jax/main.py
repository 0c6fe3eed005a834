"""Command line: ``python -m ppo_jax.main --config=experiments/default.py --workdir=DIR``.

Any config field can be overridden, ``--config.ppo.kl_coef=0.1``, and one that takes None set to
it, ``--config.ppo.vf_clip=None``; a config file takes an argument after a colon,
``--config=experiments/default.py:smoke``. The ``ppo-jax`` console script is the same program.

Compiled XLA programs are cached on disk (``~/.cache/ppo_jax/xla``; set
``PPO_JAX_COMPILATION_CACHE`` to another folder, or to an empty string to turn it off), so a second
run of the same config skips most compilation.
"""

from __future__ import annotations

import difflib
import itertools
import os
import re
import signal
import sys
import warnings
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# transformers' advice when torch is missing ("PyTorch was not found. Models won't be available"):
# ppo_jax takes only tokenizers and configs from it, so without torch nothing is missing.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from absl import flags
from ml_collections import config_flags

from ppo_jax import preemption  # no JAX: its start-up handler comes before JAX's imports


def parse_flags(argv: list[str]) -> tuple[Any, str, bool]:
  """``(config, workdir, resume)`` from the command line, on flags of this call's own (so the CLI
  runs any number of times in one process: tests, notebooks)."""
  fv = flags.FlagValues()
  fv.append_flag_values(flags.FLAGS)  # absl's own (--verbosity, --log_dir, ...), as before
  config = config_flags.DEFINE_config_file(
    "config", None, "experiment config file (python)", flag_values=fv, sys_argv=argv
  )
  workdir = flags.DEFINE_string("workdir", None, "output folder", flag_values=fv)
  resume = flags.DEFINE_bool(
    "resume",
    True,
    "continue from the workdir's finished stages and "
    "latest checkpoints (--noresume refuses a workdir with checkpoints)",
    flag_values=fv,
  )
  argv = [  # the space form, --config.ppo.vf_clip None, as --config.ppo.vf_clip=None
    f"{a}={argv[i + 1]}" if _bare(a) and argv[i + 1 : i + 2] in (["None"], ["none"]) else a
    for i, a in enumerate(argv)
    if not (i and _bare(argv[i - 1]) and a in ("None", "none"))
  ]
  dropped, nulls = _none_overrides(argv)
  fv([a for a in argv if a not in dropped])
  if config.value is None or workdir.value is None:
    raise ValueError("--config and --workdir are required (ppo-jax --help)")
  if not workdir.value.strip():  # `--workdir=$UNSET`: the current folder is no output folder
    raise ValueError("--workdir is empty; name the run's output folder")
  for dotted in nulls:
    *parents, leaf = dotted.split(".")
    node = config.value
    for key in parents:
      node = node[key]
    node[leaf] = None
  return config.value, workdir.value, resume.value


def _bare(arg: str) -> bool:
  return arg.startswith("--config.") and "=" not in arg


def _none_overrides(argv: list[str]) -> tuple[set[str], list[str]]:
  """``(args, fields)``: the ``--config.FIELD=None`` args, kept from absl (which would parse the
  text as a float or a string), and the fields they set to None (where no later arg sets them).
  ``=none`` also means None for a field that takes it; for another (``model.remat``) it stays
  the text "none"."""
  asked = {
    a: a.split("=", 1)[0][len("--config.") :]
    for a in argv
    if a.startswith("--config.") and a.partition("=")[2] in ("None", "none")
  }
  if not asked:
    return set(), []
  from ppo_jax.config import nullable_fields

  allowed = nullable_fields()
  for arg, dotted in asked.items():
    if dotted not in allowed and arg.endswith("=None"):
      raise ValueError(f"config.{dotted}: cannot be None")
  last = {a.split("=", 1)[0]: a for a in argv if a.startswith("--config.")}  # the last one wins
  dropped = {a for a, d in asked.items() if d in allowed}
  return dropped, [d for a, d in asked.items() if a in dropped and last[f"--config.{d}"] == a]


_EXPECTED = (("int()", "an integer"), ("float", "a number"), ("boolean", "true or false"))


def _one_line(e: BaseException) -> str:
  """The exception as one line (its type too, unless it is plain bad input)."""
  if isinstance(e, flags.IllegalFlagValueError):  # absl: "flag --config.a.b=v: <parser's error>"
    match = re.match(r"flag --(config\.)?([^=]+)=(.*?): (.*)$", str(e), re.DOTALL)
    if match:
      config, name, value, why = match.groups()
      expected = next((kind for key, kind in _EXPECTED if key in why), None)
      field = f"config.{name}" if config else f"--{name}"
      return f"{field}: expected {expected}, got {value!r}" if expected else f"{field}: {why}"
  if isinstance(e, flags.UnrecognizedFlagError):  # absl: "Unknown command line flag 'x'. Did…"
    match = re.match(r"Unknown command line flag '([^']+)'(?:\. Did you mean: (.+?) \?)?", str(e))
    if match:
      name, near = match.groups()
      return f"unknown flag --{name}" + (f"; did you mean --{near}?" if near else "")
  raw = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError quotes its message
  text = " ".join(str(raw).replace("\\n", " ").split()).removeprefix("Error: ")
  if text.startswith("Missing value for flag "):  # a section given as a field: --config.ppo
    return f"{text.split()[-1]}: no value (a field is --config.SECTION.FIELD=VALUE)"
  ours = text.startswith(("--", "config."))  # our own messages name the flag or field
  plain = ours or isinstance(e, (ValueError, FileNotFoundError))
  return text if plain else f"{type(e).__name__}: {text}"


def enable_compilation_cache() -> None:
  path = os.environ.get("PPO_JAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/ppo_jax/xla"))
  if path:
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # the tests set 0
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def check_override_paths(argv: list[str]) -> None:
  """Raises ValueError naming the first ``--config.a.b=…`` whose field does not exist.

  The config file is loaded here once more, only to know its fields, so a typo is reported as
  ``unknown config field 'ppo.optim.lrr'; did you mean 'ppo.optim.lr'?``, not a bare KeyError.
  """
  import importlib.util

  import ml_collections

  from ppo_jax.config import _FROM_TOKENIZER

  specs = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  specs += [b for a, b in itertools.pairwise(argv) if a == "--config"]  # absl's space form
  if len(specs) > 1:  # absl would take the last, unchecked
    raise ValueError(f"--config given {len(specs)} times ({', '.join(specs)}): give one")
  spec_arg = specs[0] if specs else None
  if spec_arg is None:
    return
  path, _, arg = spec_arg.partition(":")
  if os.path.isdir(path):
    raise ValueError(f"config file {path} is a folder; expected a python file with get_config()")
  if not os.path.isfile(path):
    raise ValueError(f"config file {path} does not exist")
  try:  # the experiment's own code: any failure is one line naming the file
    spec = importlib.util.spec_from_file_location("_ppo_jax_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise AttributeError("it defines no get_config()")
    config = module.get_config(arg or None)
  except Exception as e:
    raise ValueError(f"config file {path}: {type(e).__name__}: {e}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(
      f"config file {path}: get_config() returned {type(config).__name__}, not a ConfigDict"
    )
  for a in argv:
    if not a.startswith("--config."):
      continue
    dotted = a[len("--config.") :].split("=", 1)[0]
    if dotted.startswith("ppo.") and dotted[4:] in _FROM_TOKENIZER:
      raise ValueError(
        f"config field '{dotted}' is not set by the config: it comes from the tokenizer (and the "
        "checkpoint's config.json and generation_config.json)"
      )
    node, walked, keys = config, [], dotted.split(".")
    for i, key in enumerate(keys):
      if not hasattr(node, "keys") or key not in node:
        siblings = {k.lower(): k for k in node.keys()} if hasattr(node, "keys") else {}
        near = difflib.get_close_matches(key.lower(), siblings, n=1)
        rest, paths = keys[i + 1 :], []
        if near:  # the whole field where the rest of the path exists under the suggestion
          whole = _exists(node[siblings[near[0]]], rest)
          paths = [".".join([*walked, siblings[near[0]], *(rest if whole else [])])]
        elif not rest and hasattr(node, "keys"):  # fields of (nearly) that name deeper down
          for cutoff in (1.0, 0.75):
            found = [f for f in _fields(node) if _near(key, f.rsplit(".", 1)[-1], cutoff)]
            if found:
              paths = [".".join([*walked, f]) for f in found]
              break
        quoted = ", ".join(f"'{p}'" for p in paths[:4])
        hint = f"; did you mean {'one of ' * (len(paths) > 1)}{quoted}?" if paths else ""
        raise ValueError(f"unknown config field '{dotted}'{hint}")
      node, walked = node[key], [*walked, key]


def _fields(node, prefix: str = "") -> list[str]:
  """The dotted paths of every leaf field under ``node``."""
  out = []
  for k in node.keys():
    child = node[k]
    out += _fields(child, f"{prefix}{k}.") if hasattr(child, "keys") else [f"{prefix}{k}"]
  return out


def _near(a: str, b: str, cutoff: float) -> bool:
  """Whether ``a`` and ``b`` are alike at ``cutoff`` (difflib's ratio), case aside."""
  return difflib.SequenceMatcher(None, a.lower(), b.lower()).ratio() >= cutoff


def _exists(node, keys: list[str]) -> bool:
  """Whether the config path ``keys`` exists under ``node``."""
  for key in keys:
    if not hasattr(node, "keys") or key not in node:
      return False
    node = node[key]
  return True


_DISTRIBUTED: list[bool] = []  # set once jax.distributed is up: errors exit at once (_exit_alone)


def start_distributed(d) -> None:
  """``jax.distributed.initialize`` from config, else environment; nothing if neither says so.

  Must run before anything touches a device. Processes other than the first print nothing to
  stdout (their errors still reach stderr).
  """
  coordinator = d.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not (coordinator or d.auto):
    return
  env_int = lambda name: int(os.environ[name]) if name in os.environ else None
  num = d.num_processes if d.num_processes is not None else env_int("JAX_NUM_PROCESSES")
  pid = d.process_id if d.process_id is not None else env_int("JAX_PROCESS_ID")
  import jax

  jax.distributed.initialize(coordinator, num_processes=num, process_id=pid)
  _DISTRIBUTED.append(True)
  if jax.process_index() != 0:  # descriptor 1 itself: C++ libraries (gloo) write there too
    sys.stdout.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)


COMMANDS = ("export", "sample", "rm-eval")
USAGE = """\
usage: ppo-jax --config=FILE[:ARG] --workdir=DIR [--config.FIELD=VALUE ...] [--noresume]
       ppo-jax export --workdir=DIR --out=DIR [--stage ppo|dpo] [--step N]
       ppo-jax sample --model=DIR --prompts=FILE --out=FILE [--n=K] [--reward-model=DIR] [...]
       ppo-jax rm-eval --reward-model=DIR --pairs=FILE [--out=FILE] [...]

Runs an experiment config (experiments/*.py: get_config(arg)) end to end: SFT, reward model, then
PPO (or the algorithm config.algo names), writing everything under --workdir
(--config.stop_after=rm: up to the reward model).

  --config=FILE[:ARG]     the experiment, e.g. experiments/default.py (:smoke, a short one)
  --workdir=DIR           output folder; running again resumes from its finished stages and latest
                          checkpoints
  --config.FIELD=VALUE    override any field, e.g. --config.ppo.kl_coef=0.1 --config.seed=3;
                          --config.FIELD=None for a field that takes None
  --noresume              refuse a workdir that already holds checkpoints
  --version               ppo_jax's version and its libraries'

Every field: docs/config.md. Export a trained policy: ppo-jax export --help. Sample a policy on a
prompts file, scored by a reward model or function (best-of-n too): ppo-jax sample --help. A
reward model's accuracy on a preference file: ppo-jax rm-eval --help.
Compiled programs are cached in ~/.cache/ppo_jax/xla (PPO_JAX_COMPILATION_CACHE: another folder,
or empty for none)."""


def versions() -> str:
  """ppo_jax's version and those of the libraries it runs on, on one line."""
  import importlib.metadata

  import ppo_jax

  libs = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers")
  found = []
  for name in libs:
    try:
      found.append(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
      found.append(f"{name} missing")
  return f"ppo_jax {ppo_jax.__version__} ({', '.join(found)}; python {sys.version.split()[0]})"


def cli(argv: list[str] | None = None) -> int:
  """The ``ppo-jax`` command; its exit status. A stop while it starts (seconds of imports) ends
  it in one line, 130 for Ctrl-C, 143 for SIGTERM, before anything is written."""
  preemption.EARLY.clear()
  previous = preemption.install(preemption.early_stop)
  shown = warnings.showwarning
  warnings.showwarning = _warning_line
  _WARNED.clear()
  try:
    return _cli(argv)
  except KeyboardInterrupt:  # one that the command itself does not handle: it was starting
    term = preemption.EARLY == [signal.SIGTERM]
    print(
      f"ppo-jax: interrupted by {'SIGTERM' if term else 'Ctrl-C'} while starting; nothing was run",
      file=sys.stderr,
    )
    return 143 if term else 130
  finally:
    warnings.showwarning = shown
    preemption.restore(previous)


_WARNED: set[str] = set()


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
  """A warning as the command's one line, once (not Python's two, with a source line); a stage
  folder written in its hidden ``.NAME.partial`` staging folder is named as ``NAME``."""
  del category, filename, lineno, line
  text = re.sub(r"(^|/)\.([^/\s]+)\.partial\b", r"\1\2", str(message))
  if text not in _WARNED:
    _WARNED.add(text)
    print(f"warning: {text}", file=file or sys.stderr)


def _cli(argv: list[str] | None) -> int:
  argv = list(sys.argv if argv is None else argv)
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's INFO/WARNING chatter drowns the output
  if len(argv) > 1 and argv[1] in COMMANDS:
    from ppo_jax import commands

    preemption.raise_at_start()
    return getattr(commands, argv[1].replace("-", "_"))(argv[2:])
  if len(argv) > 1 and not argv[1].startswith("-"):  # a misspelt command, not a flag
    close = difflib.get_close_matches(argv[1], COMMANDS, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    print(
      f"ppo-jax: error: unknown command '{argv[1]}'; {hint}commands: {', '.join(COMMANDS)}, or "
      "none to run an experiment (--config=... --workdir=...)",
      file=sys.stderr,
    )
    return 2
  if any(a in ("-h", "-help", "--help", "--helpfull", "--helpshort") for a in argv[1:]):
    print(USAGE)
    return 0
  if "--version" in argv[1:]:  # what a bug report needs
    print(versions())
    return 0
  if len(argv) == 1:
    print(USAGE, file=sys.stderr)
    return 2
  try:
    check_override_paths(argv)
    config, workdir, resume = parse_flags(argv)
    from ppo_jax.config import Settings

    settings = Settings.from_config(config)  # every value checked before any work starts
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, SyntaxError) as e:
    print(f"ppo-jax: config error: {_one_line(e)}", file=sys.stderr)
    return 2
  preemption.raise_at_start()
  try:
    start_distributed(settings.distributed)
  except (RuntimeError, ValueError) as e:
    print(f"ppo-jax: error: jax.distributed: {_one_line(e)}", file=sys.stderr)
    return 1
  from ppo_jax.preemption import GUARD, STOPPED_AT_ONCE, NonFiniteError, Preempted

  enable_compilation_cache()
  from ppo_jax.pipeline import run  # seconds of imports: a Ctrl-C there ends the start (cli)

  preemption.raise_at_start()
  try:
    GUARD.exit_at_once = True  # a second Ctrl-C: this process exits, mid-save or not
    try:
      run(config, workdir, resume=resume)
    finally:
      GUARD.exit_at_once = False
  except Preempted as e:  # a requested stop: what could be saved is saved
    print(f"ppo-jax: {e}; run the same command again to resume", flush=True)
    # Not 0: the run is not done (`ppo-jax ... && ppo-jax export ...` must not go on). 130 for
    # Ctrl-C, 143 for SIGTERM or a stop agreed with another process, as a signal's death reads.
    return 130 if GUARD.signal == signal.SIGINT else 143
  except KeyboardInterrupt:  # a Ctrl-C outside the training loops (a second one exits at once)
    print("\n" + STOPPED_AT_ONCE, file=sys.stderr, flush=True)
    return _exit_alone(130)
  except (ValueError, OSError, NonFiniteError) as e:  # one line, no traceback
    print(f"ppo-jax: error: {_one_line(e)}", file=sys.stderr)
    return _exit_alone(1)
  except Exception:  # a bug: its traceback, and no hang with several processes
    import traceback

    traceback.print_exc()
    return _exit_alone(1)
  return 0


def _exit_alone(code: int) -> int:
  """``code``; with several processes, this process exits now. A process that stops on its own
  (an error only it met: a full disk as process 0 writes) would otherwise hang the job:
  ``jax.distributed``'s shutdown waits at a barrier for the others, which wait in a collective
  for it. Exited, it is seen gone, and the others fail at their next collective. (Asks no
  device: an error starting them must not start them again.)"""
  if _DISTRIBUTED:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  return code


if __name__ == "__main__":
  sys.exit(cli())
