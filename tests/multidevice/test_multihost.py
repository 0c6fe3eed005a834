"""Two processes × two CPU devices (jax.distributed, gloo) against one process × four devices."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy

ROOT = pathlib.Path(__file__).parents[2]
ITERATIONS = 4  # a SIGTERM after the first step stops the two processes before the last
ARGS = [
  f"--config={ROOT / 'experiments' / 'default.py'}:smoke",
  "--config.log.progress=False",
  "--config.task.num_prompts=256",
  "--config.task.num_sft=256",
  "--config.task.num_pairs=256",
  "--config.sft.epochs=1",
  "--config.rm.epochs=1",
  f"--config.ppo.iterations={ITERATIONS}",
  "--config.ppo.batch_size=16",
]


def _launch(workdir, devices, *extra):
  env = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "XLA_FLAGS": " ".join(
      [f for f in os.environ["XLA_FLAGS"].split() if "device_count" not in f]
      + [f"--xla_force_host_platform_device_count={devices}"]
    ),
  }
  env.pop("PPO_JAX_MULTIDEVICE", None)
  return subprocess.Popen(
    [sys.executable, "-m", "ppo_jax.main", f"--workdir={workdir}", *ARGS, *extra],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=env,
    cwd=ROOT,
  )


def _launch_two(workdir, *extra):
  """Processes 0 and 1 of a two-process run, two CPU devices each."""
  port = _free_port()
  return [
    _launch(
      workdir,
      2,
      f"--config.distributed.coordinator=127.0.0.1:{port}",
      "--config.distributed.num_processes=2",
      f"--config.distributed.process_id={i}",
      *extra,
    )
    for i in range(2)
  ]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _rows(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> pathlib.Path:
  """The workdir of the smoke pipeline (SFT, reward model, PPO) in one process × four devices:
  the reference for PPO, and the SFT policy the DPO tests start from."""
  single = tmp_path_factory.mktemp("one_process")
  proc = _launch(single, 4)
  _, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err[-3000:]
  return single


def _held_out(out: str) -> dict[str, float]:
  """The metrics of the last ``held-out: k v, …`` line a run printed."""
  line = [t for t in out.splitlines() if t.startswith("held-out: ")][-1]
  return {
    k: float(v) for k, v in (kv.rsplit(" ", 1) for kv in line[len("held-out: ") :].split(", "))
  }


def _with_stages(one_process, workdir, stages=("sft", "reward_model")):
  workdir.mkdir()
  for stage in stages:  # the same starting point: what follows is what is compared
    shutil.copytree(one_process / stage, workdir / stage)
  return workdir


def test_two_processes_match_one(tmp_path, one_process):
  """The PPO stage of two processes, stopped by SIGTERM to one of them and resumed, then run
  again: its per-step metrics are the one process's, its checkpoints those of a stopped run."""
  single = one_process
  stopped = _with_stages(single, tmp_path / "two_processes")
  # SIGTERM to the second process alone: both agree to stop after the same step, save it and
  # exit 143 (the run is not done).
  procs = _launch_two(stopped)
  metrics = stopped / "metrics.jsonl"
  t0 = time.time()
  try:  # before the fix, the two hung: one saving, the other in the next step's collectives
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
      assert all(p.poll() is None for p in procs) and time.time() - t0 < 600
      time.sleep(0.01)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 143, err[-3000:]
  assert "2 process(es)" in outs[0][0] and "mesh data 4" in outs[0][0]
  assert outs[1][0] == ""  # only the first process prints
  saved = sorted(int(p.name) for p in (stopped / "checkpoints").iterdir())
  assert saved and saved[-1] < ITERATIONS and saved[-1] == len(_rows(stopped))
  assert f"by a signal to another process after step {saved[-1]}; checkpoint saved" in outs[0][0]
  # Resumed (the same command, under another coordinator port), then run again once finished:
  # each process's own distributed.* is no config change (process 1 refused alone, and process 0
  # hung in the next collective), and the resumed key is placed across processes (it crashed).
  for _ in range(2):
    procs = _launch_two(stopped)
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
      assert p.returncode == 0, err[-3000:]
  assert "holds the finished run of this very config: nothing to do" in outs[0][0]
  a, b = _rows(single), _rows(stopped)
  assert [r["step"] for r in b] == list(range(1, ITERATIONS + 1))  # written by the first process
  for x, y in zip(a, b, strict=True):
    for k, v in x.items():
      if not k.startswith(("time/", "tokens_per_s")):
        assert y[k] == pytest.approx(v, rel=1e-3, abs=1e-5), (x["step"], k)
  assert sorted(p.name for p in (stopped / "checkpoints").iterdir())[-1] == str(ITERATIONS)
  assert (stopped / "policy" / "model.safetensors").exists()


def test_dpo_in_two_processes_matches_one(tmp_path, one_process):
  """DPO of LoRA adapters over the SFT policy (the PPO reference run's): per-step metrics, the
  held-out sampling evaluations and the merged policy of two processes × two devices are those of
  one process × four. (Full weights train across processes in the PPO test above; DPO's own parts,
  its reference log-probs, pairs and held-out rows, are the same with or without adapters.)"""
  dpo = ["--config.algo=dpo", "--config.dpo.batch_size=16", "--config.dpo.eval_every=5"]
  dpo += ["--config.data.eval_prompts=32"]  # sampled on the mesh, two batches of 16
  dpo += ["--config.ppo.lora_rank=8", "--config.ppo.lora_targets=q,k,v,o,up,down"]
  single = _with_stages(one_process, tmp_path / "one_process", stages=("sft",))
  proc = _launch(single, 4, *dpo)
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err[-3000:]
  assert "sft: loading it instead of training" in out  # DPO alone ran here

  multi = _with_stages(one_process, tmp_path / "two_processes", stages=("sft",))
  procs = _launch_two(multi, *dpo)
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  assert "2 process(es)" in outs[0][0] and outs[1][0] == ""
  # Held-out DPO metrics of all 15 held-out pairs (whole prompts, about 256 × 0.05), 15 mod 4 =
  # 3 of them replicated: two processes once left such rows out.
  a, b = _held_out(out), _held_out(outs[0][0])
  assert a.keys() == b.keys() and a["eval_rows"] == b["eval_rows"] == 15
  for k in a:
    assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-4), k
  for name in ("dpo_metrics.jsonl", "metrics.jsonl"):  # training steps; held-out samples
    a, b = (
      [json.loads(line) for line in (w / name).read_text().splitlines()] for w in (single, multi)
    )
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) > 1, name
    for x, y in zip(a, b, strict=True):
      for k, v in x.items():
        if not k.startswith(("time/", "tokens_per_s")):
          assert y[k] == pytest.approx(v, rel=1e-3, abs=1e-5), (name, x["step"], k)
  # The policy the two processes gathered (LoRA: merged on the host) is the one process's.
  load = lambda w: safetensors.numpy.load_file(str(w / "policy" / "model.safetensors"))
  a, b = load(single), load(multi)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-5, err_msg=k)  # measured: 1.4e-6
  assert sorted(p.name for p in (multi / "dpo_checkpoints").iterdir()) == sorted(
    p.name for p in (single / "dpo_checkpoints").iterdir()
  )


def test_placement_across_two_processes():
  """``sharding.place`` of a typed PRNG key (it has no NumPy form: it raised a TypeError) and
  ``place_batch`` on a mesh whose batch blocks of one process are not contiguous (as a TPU pod's
  topology-ordered mesh gives: it raised 'non-contiguous rows'): every process reads back the
  values placed."""
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PPO_JAX_MULTIDEVICE")}
  script = pathlib.Path(__file__).with_name("two_process_placement.py")
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), str(i), str(port)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env={**env, "PYTHONPATH": str(ROOT)},
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  got = [json.loads(out.splitlines()[-1]) for out, _ in outs]
  import jax

  want_key = np.asarray(jax.random.key_data(jax.random.key(7))).tolist()
  rows = np.arange(16).reshape(8, 2).tolist()
  for g in got:
    assert g["key_typed"] and g["key_data"] == want_key
    assert g["w"] == np.arange(8.0).reshape(4, 2).tolist() and g["batch"] == rows
  assert got[0]["first_rows_held"] == [0, 4] and got[1]["first_rows_held"] == [2, 6]


def test_an_error_of_process_0_alone_ends_the_job(tmp_path):
  """Process 0 fails writing a file (a folder in the way of summary.json: a full disk would do)
  while process 1 goes on: process 0 said it in one line and exits at once (it hung in
  jax.distributed's shutdown barrier while process 1 waited for it in a collective), and process
  1 then fails too: the job ends, it does not hang."""
  (tmp_path / "summary.json").mkdir(parents=True)
  procs = _launch_two(tmp_path)
  outs = [p.communicate(timeout=240) for p in procs]
  assert procs[0].returncode == 1 and procs[1].returncode != 0
  err0 = outs[0][1].strip().splitlines()
  assert err0[-1].startswith("ppo-jax: error: IsADirectoryError: ") and "summary.json" in err0[-1]


SHARES = """
import json, sys
import jax
import numpy as np

jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from ppo_jax.evaluation import Prompts, shared_scores
from ppo_jax.rewards import RewardError

seen = []


def by_answer(prompts, responses, answer):
  seen.append(list(prompts))
  return [a * len(r) for a, r in zip(answer, responses)]


def nan_for_p3(prompts, responses):
  return [float("nan") if p == "p3" else 1.0 for p in prompts]


n = 5
rows = Prompts([f"p{i}" for i in range(n)], np.zeros((n, 1), np.int32), np.ones((n, 1), np.int32))
rows.columns = {"answer": [10 * i for i in range(n)]}
out = {"scores": shared_scores(by_answer, rows, ["x" * (i + 1) for i in range(n)]).tolist()}
out["seen"] = seen[:]
try:
  shared_scores(nan_for_p3, rows, ["y"] * n, name="gold scorer", step=3)
except RewardError as e:
  out["error"] = str(e)
seen.clear()  # groups of responses to one prompt: a share is cut between prompts only
groups = Prompts(list("aabbbc"), np.zeros((6, 1), np.int32), np.ones((6, 1), np.int32))
groups.columns = {"answer": [1] * 6}
out["grouped"] = shared_scores(by_answer, groups, ["z"] * 6).tolist()
out["groups_seen"] = seen[:]
# Several functions: each one's scores gathered, and their weighted sum.
from ppo_jax.evaluation import shared_score_parts
from ppo_jax.rewards import RewardSum

both = RewardSum((by_answer, lambda p, r: [len(x) for x in r]), ("m:a", "m:b"), (2.0, -1.0))
texts = ["x" * (i + 1) for i in range(n)]
out["parts"] = shared_score_parts(both, rows, texts).tolist()
out["summed"] = shared_scores(both, rows, texts).tolist()
print(json.dumps(out))
"""


def test_a_reward_function_scores_each_process_share_of_the_rows(tmp_path):
  """With two processes each calls the reward function on its own rows (3 and 2 of 5, with
  their fields; a prompt's group of responses kept whole), and both hold every score; a
  function failing on one process's rows stops both, in one line each: the error where it was
  met, elsewhere which process met it."""
  script, port = tmp_path / "shares.py", _free_port()
  script.write_text(SHARES)
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""}
  env.pop("PPO_JAX_MULTIDEVICE", None)
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), f"127.0.0.1:{port}", str(i)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  first, second = (json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
  want = [10.0 * i * (i + 1) for i in range(5)]
  assert first["scores"] == second["scores"] == want
  assert first["seen"] == [["p0", "p1", "p2"]] and second["seen"] == [["p3", "p4"]]
  assert first["grouped"] == second["grouped"] == [1.0] * 6
  assert first["groups_seen"] == [list("aabbb")] and second["groups_seen"] == [["c"]]
  assert first["parts"] == second["parts"] == [[w, i + 1.0] for i, w in enumerate(want)]
  assert first["summed"] == second["summed"] == [2 * w - i - 1 for i, w in enumerate(want)]
  assert second["error"] == (
    "gold scorer at step 3 returned non-finite scores (NaN or inf) for 1 of 5 responses (indices 3)"
  )
  assert first["error"] == (
    "gold scorer at step 3 failed on process 1 (its error is on that process's stderr)"
  )
