"""Test-wide settings (offline Hugging Face, a per-session XLA compilation cache), the named mask
cases as a fixture, and one smoke run of the whole pipeline that several tests read."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Programs compiled by one test (or notebook kernel) are reused by the next; set before jax loads.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="ppo_jax_xla_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("PPO_JAX_COMPILATION_CACHE", os.environ["JAX_COMPILATION_CACHE_DIR"])

import pathlib
import shutil

import numpy as np
import pytest
from cases import MASKS

ROOT = pathlib.Path(__file__).parent.parent
# tests/multidevice needs 8 devices from the start: test_sharding.py runs it in its own process.
collect_ignore = [] if os.environ.get("PPO_JAX_MULTIDEVICE") == "1" else ["multidevice"]


@pytest.fixture(params=list(MASKS), ids=list(MASKS))
def mask(request) -> np.ndarray:
  return MASKS[request.param]


def smoke_config(**overrides):
  """experiments/default.py:smoke, quiet, with ``section__field=value`` overrides."""
  from ppo_jax.config import load_experiment

  config = load_experiment(ROOT / "experiments" / "default.py", "smoke")
  config.log.progress = False
  config.log.tensorboard = True
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
  """(workdir, summary) of one full smoke run: SFT → reward model → PPO."""
  from ppo_jax import pipeline

  workdir = tmp_path_factory.mktemp("smoke")
  summary = pipeline.run(smoke_config(), workdir)
  return workdir, summary


def reuse_stages(
  smoke_workdir: pathlib.Path, workdir: pathlib.Path, stages=("sft", "reward_model")
) -> pathlib.Path:
  """A new workdir holding the smoke run's finished stages, so only PPO runs there."""
  workdir.mkdir(parents=True, exist_ok=True)
  for stage in stages:
    shutil.copytree(smoke_workdir / stage, workdir / stage)
  return workdir
