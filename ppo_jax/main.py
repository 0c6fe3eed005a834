"""Command line: ``python -m ppo_jax.main --config=experiments/default.py --workdir=DIR``.

Any config field can be overridden, ``--config.ppo.kl_coef=0.1``; a config file takes an argument
after a colon, ``--config=experiments/default.py:smoke``. The ``ppo-jax`` console script is the
same program.

Compiled XLA programs are cached on disk (``~/.cache/ppo_jax/xla``; set
``PPO_JAX_COMPILATION_CACHE`` to another folder, or to an empty string to turn it off), so a second
run of the same config skips most compilation.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (python)")
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder")


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).replace("\\n", " ").split()).strip("'\"")
  return (
    f"{type(e).__name__}: {text}" if not isinstance(e, (ValueError, FileNotFoundError)) else text
  )


def enable_compilation_cache() -> None:
  path = os.environ.get("PPO_JAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/ppo_jax/xla"))
  if path:
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def cli(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  try:
    flags.FLAGS(argv)
    if _CONFIG.value is None or _WORKDIR.value is None:
      raise flags.Error("--config and --workdir are required")
    config = _CONFIG.value
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    print(f"ppo-jax: config error: {_one_line(e)}", file=sys.stderr)
    return 2
  from ppo_jax.pipeline import run

  enable_compilation_cache()
  try:
    run(config, _WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:  # bad input: one line, no traceback
    print(f"ppo-jax: error: {_one_line(e)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(cli())
