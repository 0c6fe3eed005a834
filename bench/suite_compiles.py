"""Where the test suite's time goes: every XLA compilation, in every process, by test and program.

Runs pytest with the given arguments, every Python process it starts (CLI subprocesses, notebook
kernels, the multidevice run, the two-process runs) recording each backend compilation's seconds
with the test that was running (``PYTEST_CURRENT_TEST``, inherited by subprocesses) through a
``jax.monitoring`` listener, then prints the totals: per process, per program name and per test
file. A compilation of a program found in the persistent cache is counted too (its load, mostly
< 1 s), so misses are the long ones.

  python bench/suite_compiles.py                      # the whole suite
  python bench/suite_compiles.py tests/test_ppo.py -k lr   # any pytest arguments
"""

from __future__ import annotations

import collections
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SLOW = 0.05  # seconds: shorter ones are cache loads and one-line programs

# Imported first by every Python process (PYTHONPATH): registers the listener as soon as JAX's
# monitoring module loads, without importing JAX (its settings are read as it loads).
SITECUSTOMIZE = """
import importlib.abc, importlib.machinery, os, sys

def _listener(event, duration, **kw):
  if event == "/jax/core/compile/backend_compile_duration":
    test = os.environ.get("PYTEST_CURRENT_TEST", "-").split(" (")[0]
    with open(os.path.join(os.environ["SUITE_COMPILES_DIR"], f"{os.getpid()}.tsv"), "a") as f:
      f.write(f"{test}\\t{kw.get('fun_name')}\\t{duration:.4f}\\n")

class _Finder(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name != "jax._src.monitoring":
      return None
    sys.meta_path.remove(self)
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    run = spec.loader.exec_module
    def exec_module(module):
      run(module)
      module.register_event_duration_secs_listener(_listener)
    spec.loader.exec_module = exec_module
    return spec

sys.meta_path.insert(0, _Finder())
"""


def main(args: list[str]) -> int:
  hook, logs = tempfile.mkdtemp(prefix="suite_compiles_hook_"), tempfile.mkdtemp(prefix="sc_")
  pathlib.Path(hook, "sitecustomize.py").write_text(SITECUSTOMIZE)
  path = os.pathsep.join(p for p in (hook, os.environ.get("PYTHONPATH")) if p)
  env = {**os.environ, "PYTHONPATH": path, "SUITE_COMPILES_DIR": logs, "HF_HUB_OFFLINE": "1"}
  t0 = time.perf_counter()
  cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]
  proc = subprocess.Popen(cmd, env=env)
  code, main_pid = proc.wait(), str(proc.pid)
  wall = time.perf_counter() - t0
  rows = []  # (pid, test, program, seconds)
  for f in pathlib.Path(logs).glob("*.tsv"):
    for line in f.read_text().splitlines():
      test, fun, seconds = line.split("\t")
      rows.append((f.stem, test, fun, float(seconds)))
  if not rows:
    print("no compilations recorded")
    return code
  by_pid = collections.Counter()
  for pid, _, _, s in rows:
    by_pid[pid] += s
  slow = [r for r in rows if r[3] > SLOW]
  print(f"\npytest exit {code}, {wall:.0f} s; {len(rows)} compilations, {len(slow)} over {SLOW} s")
  others = [s for pid, s in by_pid.most_common() if pid != main_pid]
  listed = ", ".join(f"{s:.0f} s" for s in others[:8])
  print(f"pytest's process: {by_pid[main_pid]:.0f} s compiling; {len(others)} others: {listed}")

  def table(title, key):
    n, s = collections.Counter(), collections.Counter()
    for r in slow:
      n[key(r)] += 1
      s[key(r)] += r[3]
    print(f"{title} (compilations over {SLOW} s):")
    for k, v in s.most_common(15):
      print(f"  {v:7.1f} s {n[k]:5d}  {k}")

  table("by program", lambda r: r[2])
  table("by test file", lambda r: ("" if r[0] == main_pid else "(sub) ") + r[1].split("::")[0])
  return code


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
