"""What a resumed run compiles: a PPO stage run fresh, then resumed twice, in one process.

The smoke config with a programmatic reward (no SFT, no reward model), batch 8, its decaying
learning-rate schedule (raising ``ppo.iterations`` moves its end, an input of the programs), and
an on-disk compilation cache that keeps every program. It runs 1 iteration, then resumes to 2
and to 3, and prints each run's seconds and the XLA programs it compiled (a cache hit compiles
nothing). A resume that lowered other programs than the fresh run's compiles them again here.

  python bench/resume_compiles.py           # PPO alone: a programmatic reward, no SFT
  python bench/resume_compiles.py --stages  # SFT and a reward model (short) before PPO
  python bench/resume_compiles.py --dpo     # SFT, then DPO of LoRA adapters, 1 → 2 → 3 epochs
  python bench/resume_compiles.py --sweep   # three fresh PPO runs (own workdirs) that differ
                                            # only in PPO's numbers (clip ε, γ, λ, τ, …)
  python bench/resume_compiles.py --sweep --dpo  # three fresh DPO runs: β and ε only
  python bench/resume_compiles.py --mesh    # any of the above on 8 simulated CPU devices, mesh
                                            # data 2 × fsdp 2 × tensor 2
"""

from __future__ import annotations

import collections
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE = tempfile.mkdtemp(prefix="ppo_jax_bench_cache_")
STAGES, DPO, MESH, SWEEP = (f"--{x}" in sys.argv[1:] for x in ("stages", "dpo", "mesh", "sweep"))
# --sweep: each run's numbers (hparams.NUMBERS), the first the config's own
SWEEP_POINTS = (
  {},
  {"clip_eps": 0.1, "gamma": 0.9, "lam": 0.9, "vf_coef": 0.5, "temperature": 0.9},
  {"clip_eps": 0.3, "gamma": 0.99, "lam": 0.8, "entropy_coef": 0.01, "vf_clip": 0.5},
)
if DPO:
  SWEEP_POINTS = ({}, {"beta": 0.3}, {"beta": 0.05, "label_smoothing": 0.1})
if MESH:  # before jax loads: the device count is fixed then
  flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
os.environ.update(
  HF_HUB_OFFLINE="1",
  JAX_COMPILATION_CACHE_DIR=CACHE,
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
)
sys.path.insert(0, str(ROOT / "tests"))  # reward_fns:superlatives, the tests' reward function

from jax._src import compiler  # noqa: E402  (after the cache settings: read as jax loads)

from ppo_jax import pipeline  # noqa: E402
from ppo_jax.config import load_experiment  # noqa: E402

compiled: list[str] = []
_compile_and_load = compiler.backend_compile_and_load


def _counted(backend, module, *args, **kwargs):
  compiled.append(str(module.operation.attributes["sym_name"]).strip('"'))
  return _compile_and_load(backend, module, *args, **kwargs)


compiler.backend_compile_and_load = _counted


def dpo_config(epochs: int):
  """DPO with LoRA adapters over a short SFT (trained by the fresh run, loaded by the resumes);
  ``epochs`` of a small pair set, so that each resume goes on from the last checkpoint."""
  c = load_experiment(ROOT / "experiments" / "dpo.py", "smoke")
  c.sft.epochs, c.task.num_sft, c.task.num_pairs = 0.25, 256, 128
  c.dpo.epochs, c.data.eval_prompts = float(epochs), 8
  c.ppo.lora_rank = 4
  return c


def config(iterations: int, stages: bool = False):
  c = load_experiment(ROOT / "experiments" / "default.py", "smoke")
  if stages:  # SFT and the reward model trained by the fresh run, loaded from disk by the resumes
    c.sft.epochs = c.rm.epochs = 0.25
    c.task.num_sft = c.task.num_pairs = 256
  else:
    c.sft.epochs, c.rm.enabled = 0.0, False
    c.reward.source, c.reward.fn = "function", "reward_fns:superlatives"
    c.ppo.critic_init = "policy"
  c.ppo.iterations, c.ppo.batch_size = iterations, 8
  return c


def main() -> None:
  workdir = pathlib.Path(tempfile.mkdtemp(prefix="ppo_jax_bench_resume_"))
  for i, iterations in enumerate((1, 2, 3)):
    c = dpo_config(iterations) if DPO else config(iterations, STAGES)
    if SWEEP:  # a fresh run of one iteration (epoch) with other numbers, in its own workdir
      c = dpo_config(1) if DPO else config(1, STAGES)
      (c.dpo if DPO else c.ppo).update(SWEEP_POINTS[i])
      workdir = pathlib.Path(tempfile.mkdtemp(prefix="ppo_jax_bench_sweep_"))
    c.log.progress = c.log.tensorboard = c.log.plots = False
    if MESH:
      c.mesh.shape = (2, 2, 2)
    compiled.clear()
    t0 = time.perf_counter()
    pipeline.run(c, workdir)
    seconds = time.perf_counter() - t0
    kind = "fresh" if iterations == 1 else "resume"
    kind = f"sweep point {i} {SWEEP_POINTS[i]}" if SWEEP else f"{kind} to {iterations}"
    names = ", ".join(f"{n} ×{k}" for n, k in collections.Counter(compiled).most_common())
    print(f"{kind}: {seconds:.1f} s, {len(compiled)} programs compiled: {names}")


if __name__ == "__main__":
  main()
