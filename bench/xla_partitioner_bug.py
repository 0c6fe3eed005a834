"""XLA's SPMD partitioner miscompiles a gradient when two layers split a dimension differently.

  python bench/xla_partitioner_bug.py [--no-shardy]

No ppo_jax code: ``loss = Σ take_along_axis((z W) H, ids)`` with ``ids`` pinned over the rows
``('data', 'fsdp')``, ``W [R, D]`` splitting D over ``tensor`` and ``H [D, V]`` splitting D over
``fsdp``. On 8 CPU devices as a 2 × 2 × 2 mesh, ``∂L/∂z`` comes back with its row blocks 1 and 2
(of 4) swapped and ``∂L/∂W`` wrong; on 8 × 1 × 1 both are right, and so is the forward pass.
After partitioning, the scatter of the gather's backward runs on each device's row block, then a
``collective-permute`` exchanges devices 2↔4 and 3↔5 (the (data, fsdp) → (fsdp, data) order)
while the rest of the program keeps the original layout. Shardy and GSPMD alike (jax 0.10.2,
2026-12-05). It is why ``ppo_jax.sharding.RULES`` keep D on ``fsdp`` and inner widths on
``tensor`` in every layer: with LoRA adapters of o and down split otherwise, PPO's update on a
2 × 2 × 2 mesh came out wrong (``tests/multidevice/test_sharded_step.py``). Kept here to report
upstream and to check new XLA releases.
"""

import argparse
import os

os.environ["XLA_FLAGS"] = (
  f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
)

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

N, R, D, V = 56, 4, 32, 64  # rows, inner width, model width, vocabulary


def loss(w_RxD, z_NxR, head_DxV, ids_N, mesh=None):
  if mesh is not None:
    ids_N = jax.lax.with_sharding_constraint(ids_N, NamedSharding(mesh, P(("data", "fsdp"))))
  logits = (z_NxR @ w_RxD) @ head_DxV
  return jnp.sum(jnp.take_along_axis(logits, ids_N[:, None], axis=-1))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--no-shardy", action="store_true", help="GSPMD instead of Shardy")
  args = parser.parse_args()
  if args.no_shardy:
    jax.config.update("jax_use_shardy_partitioner", False)
  rng = np.random.default_rng(0)
  w, z, head = (
    (0.2 * rng.standard_normal(shape)).astype(np.float32) for shape in ((R, D), (N, R), (D, V))
  )
  ids = rng.integers(0, V, (N,)).astype(np.int32)
  grads = jax.grad(loss, argnums=(0, 1))
  want_w, want_z = map(np.asarray, jax.jit(grads)(w, z, head, ids))  # one device, no shardings
  q = N // 4
  swapped = np.concatenate([want_z[:q], want_z[2 * q : 3 * q], want_z[q : 2 * q], want_z[3 * q :]])
  print(f"jax {jax.__version__}, Shardy {jax.config.jax_use_shardy_partitioner}")
  for shape in ((8, 1, 1), (2, 2, 2)):
    mesh = jax.make_mesh(
      shape, ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
    )
    specs = (P(None, "tensor"), P(), P("fsdp", "tensor"), P())
    step = jax.jit(
      lambda *a, mesh=mesh: grads(*a, mesh), in_shardings=[NamedSharding(mesh, s) for s in specs]
    )
    got_w, got_z = map(np.asarray, step(w, z, head, ids))
    blocks = np.allclose(got_z, swapped, atol=1e-5) and not np.allclose(got_z, want_z, atol=1e-5)
    print(
      f"mesh {shape}: max |dz − ref| {np.abs(got_z - want_z).max():.3g}, max |dW − ref| "
      f"{np.abs(got_w - want_w).max():.3g}; dz is ref with row blocks 1 and 2 swapped: {blocks}"
    )


if __name__ == "__main__":
  main()
