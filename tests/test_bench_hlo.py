"""bench/hlo.py: trip counts and weight casts of compiled loops, read from real XLA programs."""

import pathlib
import re
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from ppo_jax.models import CausalLM
from ppo_jax.sampling import sample

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "bench"))
from accelerator import tiny_llama
from hlo import loop_report


def _hlo(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


def test_a_cast_of_a_loop_variant_weight_is_found_with_the_trip_count():
  def fn(w, x):
    def body(i, carry):
      w, x = carry
      w = w * 1.0001  # loop-variant: the cast cannot be hoisted
      w16 = w.astype(jnp.bfloat16)
      return w, (x @ w16) @ w16.T

    return jax.lax.fori_loop(0, 7, body, (w, x))

  hlo = _hlo(fn, jnp.ones((64, 32)), jnp.ones((4, 64), jnp.bfloat16))
  (loop,) = loop_report(hlo, shapes=[(32, 64)])  # either order of the dims
  assert loop.trip_count == 7
  assert [c.dims for c in loop.converts] == [(64, 32)]
  assert loop.convert_bytes == 64 * 32 * 4
  assert loop_report(hlo, shapes=[(16, 16)]) == []  # carries no array of that shape


def test_a_data_dependent_exit_has_no_known_trip_count():
  def fn(w, x, limit):
    return jax.lax.while_loop(
      lambda c: jnp.sum(c[1]) < limit, lambda c: (c[0], c[1] @ c[0]), (w, x)
    )[1]

  (loop,) = loop_report(_hlo(fn, jnp.ones((8, 8)), jnp.ones((2, 8)), 3.0), shapes=[(8, 8)])
  assert loop.trip_count is None and loop.converts == ()


def test_older_dumps_with_operand_shapes_inline():
  hlo = (
    """HloModule m, entry_computation_layout={(f32[8,4]{1,0})->f32[8,4]{1,0}}

%fused (p: f32[8,4]) -> bf16[8,4] {
  %p = f32[8,4]{1,0} parameter(0)
  ROOT %c = bf16[8,4]{1,0} convert(f32[8,4]{1,0} %p)
}

%body (t: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %t = (s32[], f32[8,4]{1,0}) parameter(0)
  %w = f32[8,4]{1,0} get-tuple-element(%t), index=1
  %f = bf16[8,4]{1,0} fusion(%w), kind=kLoop, calls=%fused
  ROOT %r = (s32[], f32[8,4]{1,0}) tuple(%i, %w)
}

ENTRY %main (a: f32[8,4]) -> f32[8,4] {
  %loop = (s32[], f32[8,4]{1,0}) while(%init), condition=%cond, body=%body, """
    + ("""backend_config={"known_trip_count":{"n":"3"}}""")
    + """
  ROOT %out = f32[8,4]{1,0} get-tuple-element(%loop), index=1
}
"""
  )
  (loop,) = loop_report(hlo, shapes=[(8, 4)])
  assert loop.name == "loop" and loop.trip_count == 3
  assert [(c.dims, c.target_dtype) for c in loop.converts] == [((8, 4), "bf16")]


def test_the_fixed_length_sampler_of_the_benchmark_model():
  cfg = tiny_llama(dtype="bfloat16", param_dtype="float32")  # accelerator.py --preset tiny
  graphdef, params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))
  pure = nnx.to_pure_dict(params)
  ids = jnp.ones((2, 5), jnp.int32)
  hlo = _hlo(
    lambda p, i, m, k: sample(graphdef, p, i, m, k, max_new_tokens=6),
    pure,
    ids,
    jnp.ones_like(ids),
    jax.random.key(0),
  )
  weights = {x.shape for x in jax.tree.leaves(pure) if x.ndim >= 2}
  (loop,) = loop_report(hlo, shapes=weights)
  assert loop.trip_count == 5 and loop.converts == ()


def test_the_gpu_benchmarks_run_on_the_cpu(monkeypatch, capsys, tmp_path):
  """The script a GPU session runs first (bench/gpu_session.sh), at its tiny preset: device time
  is rare, so a refactor that breaks it must fail here. It prints its figures; cuDNN, absent
  here, is reported unavailable rather than fatal. The two attention microbenchmarks are only
  imported (what they import from ppo_jax and jax must exist): running them adds ~12 s of
  compilation to the suite for a few lines of timing code."""
  import accelerator
  import attention
  import decode_attention

  def run(*args):
    monkeypatch.setattr(sys, "argv", ["accelerator", "--preset", "tiny", "--repeats", "1", *args])
    accelerator.main()
    return capsys.readouterr().out

  out = run()
  last = out.strip().splitlines()[-1]
  # The tiny preset's timings are noise on a busy CPU (a step can even time below zero): only
  # the line's form is checked.
  assert re.fullmatch(r"accelerator: train_mfu=-?[0-9.]+ decode_roofline=-?[0-9.]+", last), out
  assert "measured peaks: bf16 matmul" in out and "log-probs, full forward (xla)" in out
  profile = tmp_path / "profile.txt"
  out = run("--decode-only", "--lora", "4", "--profile-out", str(profile))
  # The adapters folded: no float32 cast in the loop.
  assert "LoRA rank 4 on q,k,v,o,gate,up,down" in out and "15 trips known to XLA" in out, out
  assert profile.read_text().startswith("one sampler call: prefill + 15 decode steps\n")
  assert "op family" in profile.read_text()
  assert out.strip().splitlines()[-1].startswith("accelerator: train_mfu=skipped decode_roof")
  assert callable(attention.main) and callable(decode_attention.main)


def test_a_trace_is_summed_per_op_family(tmp_path):
  """bench/profile_ops.py: the ops of a traced XLA program, summed by family, largest first."""
  from profile_ops import family, summarize

  assert family("loop_add_fusion.12") == "loop_add_fusion"
  assert family("sm90_xmma_gemm<bf16, 128>(...)") == "sm90_xmma_gemm"
  f = jax.jit(lambda x: jax.lax.fori_loop(0, 5, lambda i, y: jnp.tanh(y @ y), x))
  x = jnp.eye(64)
  f(x).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    f(x).block_until_ready()
  rows = [
    r.split() for r in summarize(str(tmp_path)).splitlines() if r.startswith("  ") and "%" in r
  ]
  assert rows, summarize(str(tmp_path))
  ms = [float(r[0]) for r in rows]
  assert ms == sorted(ms, reverse=True) and all(int(r[2]) >= 1 for r in rows)
  assert summarize(str(tmp_path / "none")).startswith("no trace under")
