"""Test-wide settings (offline Hugging Face, a per-session XLA compilation cache), the named mask
cases as a fixture, and one smoke run of the whole pipeline that several tests read."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Programs compiled by one test (or notebook kernel, or CLI subprocess) are reused by the next; set
# before jax loads. Every program is cached, however fast it compiled: the tests rebuild the same
# small programs many times (tests/test_checkpoint.py at 0.5 s, the CLI's default: 177 → 163 s).
# The pytest process that makes the directory removes it at exit (each run left ~60 MB in /tmp);
# the tests' subprocesses inherit it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ppo_jax_xla_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("PPO_JAX_COMPILATION_CACHE", os.environ["JAX_COMPILATION_CACHE_DIR"])
# Compiling takes most of most tests' time. LLVM at -O0 compiles XLA:CPU's programs about a third
# faster than at -O1 (the smoke CLI run: 18.8 → 13.5 s compiling), though it runs them slower
# (24.4 → 37.7 s running, 2026-12-07). Over the whole suite the compiling wins: in clean-clone runs
# of one evening, O1 → O0, the three processes' tests took 1237 → 1063 s (main), 1134 → 924 s
# (multidevice) and 459 → 398 s (side); only test_checkpoint.py's long CLI runs (+28 s) and
# test_pipeline.py (+3 s) slowed. XLA's own passes (fusion, layout, the HLO the bench tests read)
# are the same; results compared bitwise are compared at one level. At XLA's default, -O3:
# XLA_FLAGS=--xla_backend_optimization_level=3 (the tests' subprocesses inherit it, as this).
# Not used: XLA's older loop emitters (--xla_cpu_use_fusion_emitters=false) cut the compiling by a
# third again, but round otherwise than the default's fusion emitters users run: three tests that
# compare two programs' results closely failed with them (2026-12-07).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()

import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
from typing import ClassVar

import numpy as np
import pytest
from cases import MASKS

ROOT = pathlib.Path(__file__).parent.parent
IN_MULTIDEVICE = os.environ.get("PPO_JAX_MULTIDEVICE") == "1"
IN_SIDE_RUN = IN_MULTIDEVICE or os.environ.get("PPO_JAX_SIDE_RUN") == "1"
# tests/multidevice needs 8 devices from the start: test_sharding.py runs it in its own process.
collect_ignore = [] if IN_MULTIDEVICE else ["multidevice"]
MULTIDEVICE_TEST = "tests/test_sharding.py::test_multidevice_suite"
# Single-device files that run in a process of their own when SIDE_TEST is selected (the whole
# suite): the multidevice run alone left the second core idle for the suite's last minutes.
# Self-contained (no session fixture here, such as smoke_run, would then run twice).
SIDE_FILES = ("tests/test_models.py", "tests/test_inference.py", "tests/test_sampling.py")
SIDE_TEST = "tests/test_side_run.py::test_side_files"


class SideRun:
  """Tests in a pytest process of their own, beside this one: ``multidevice`` (tests/multidevice
  on 8 simulated CPU devices: the device count is fixed when JAX starts, and it would change every
  single-device result here) and ``side`` (``SIDE_FILES``).

  Each starts as soon as collection selects its test (``MULTIDEVICE_TEST``, ``SIDE_TEST``) and
  runs beside the single-device tests, which leave the second core idle much of the time (mostly
  one-threaded compilation); the test waits for it and reads its output.
  """

  _started: ClassVar[dict[str, "SideRun"]] = {}

  def __init__(self, name: str):
    if name == "multidevice":
      paths = [str(ROOT / "tests" / "multidevice")]
      env = {
        **os.environ,
        "PPO_JAX_MULTIDEVICE": "1",
        "XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=8",
      }
      env.pop("JAX_COMPILATION_CACHE_DIR", None)  # programs for 8 devices: a cache of their own
    else:  # the same single-device programs: the same cache
      paths, env = [str(ROOT / f) for f in SIDE_FILES], {**os.environ, "PPO_JAX_SIDE_RUN": "1"}
    self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: nobody reads it until the end
    # At a lower priority: these take the core the single-device suite leaves idle (its
    # compilation is one-threaded) rather than half of both. The multidevice run less low: it is
    # the longest (at nice 10 like the side run, it ended ~100 s after the main process's tests).
    self.proc = subprocess.Popen(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *paths],
      stdout=self.log, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    # Set from here, not in the child (a preexec_fn forks a process JAX's threads run in); the
    # processes it starts, seconds later, inherit it.
    os.setpriority(os.PRIO_PROCESS, self.proc.pid, 5 if name == "multidevice" else 10)

  @classmethod
  def start(cls, name: str) -> "SideRun":
    """The run ``name`` of this session, started now if collection did not start it."""
    if name not in cls._started:
      cls._started[name] = cls(name)
    return cls._started[name]

  def wait(self, timeout: float) -> tuple[int, str]:
    """(exit status, everything it printed)."""
    try:
      code = self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      raise
    self.log.seek(0)
    return code, self.log.read()

  def passed(self, timeout: float = 1800) -> tuple[int, str]:
    """(how many tests passed, everything it printed), once it ended; it must have exited 0."""
    code, out = self.wait(timeout)
    assert code == 0, out[-9000:]
    count = re.search(r"(\d+) passed", out)
    return (int(count.group(1)) if count else 0), out

  @classmethod
  def stop(cls) -> None:
    for run in cls._started.values():
      if run.proc.poll() is None:
        run.proc.kill()
        run.proc.wait()


def pytest_collection_modifyitems(config, items):
  """With ``SIDE_TEST`` selected, ``SIDE_FILES``' tests are left to its process; the tests that
  wait for the side runs go last, so that this process has run all the rest when it waits."""
  if IN_SIDE_RUN:
    return
  if any(i.nodeid == SIDE_TEST for i in items):
    elsewhere = [i for i in items if i.nodeid.startswith(tuple(f"{f}::" for f in SIDE_FILES))]
    if elsewhere:
      config.hook.pytest_deselected(items=elsewhere)
      items[:] = [i for i in items if i not in elsewhere]
  waits = [i for i in items if i.nodeid in (MULTIDEVICE_TEST, SIDE_TEST)]
  items[:] = [i for i in items if i not in waits] + waits


def pytest_collection_finish(session):
  if IN_SIDE_RUN or session.config.option.collectonly:  # --collect-only runs no test
    return
  selected = {i.nodeid for i in session.items}
  for name, test in (("multidevice", MULTIDEVICE_TEST), ("side", SIDE_TEST)):
    if test in selected:
      SideRun.start(name)


def pytest_sessionfinish(session, exitstatus):
  SideRun.stop()  # a session that ended early (-x, Ctrl-C) leaves no process behind


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


@pytest.fixture
def compiled_programs(monkeypatch) -> list[str]:
  """The names of the XLA programs compiled from now on in this test, read through JAX's own
  compile hook (a hit in the on-disk cache, which keeps every program here, compiles nothing)."""
  from jax._src import compiler

  names, compile_and_load = [], compiler.backend_compile_and_load

  def counted(backend, module, *args, **kwargs):
    names.append(str(module.operation.attributes["sym_name"]).strip('"'))
    return compile_and_load(backend, module, *args, **kwargs)

  monkeypatch.setattr(compiler, "backend_compile_and_load", counted)
  return names


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


@pytest.fixture
def terminal_sigint():
  """SIGINT as in a terminal, Python's KeyboardInterrupt (a background job, as CI runs the tests,
  starts with it ignored, and ppo_jax leaves an ignored signal ignored); put back after the
  test."""
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, previous)


def sigterm_when(predicate, timeout=300):
  """Sends this process SIGTERM once ``predicate()`` holds (the run's guard turns it into a stop
  at the next step boundary); gives up after ``timeout`` seconds."""

  def watch():
    t0 = time.time()
    while time.time() - t0 < timeout:
      if predicate():
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.001)

  threading.Thread(target=watch, daemon=True).start()


def count_lines(path):
  return len(path.read_text().splitlines()) if path.exists() else 0
