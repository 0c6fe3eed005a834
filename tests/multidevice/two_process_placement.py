"""Run by test_multihost.py as two processes of two CPU devices each (argv: process id, port):
``sharding.place`` of a tree holding a typed PRNG key, and ``sharding.place_batch`` on a mesh that
interleaves the processes' devices; prints what every process reads back, as JSON."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax
import numpy as np

process_id, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

from ppo_jax import sharding as shd  # noqa: E402

mesh = shd.make_mesh((2, 2, 1))
tree = {"key": jax.random.key(7), "w": np.arange(8.0).reshape(4, 2)}
placed = shd.place(tree, {"key": shd.replicated(mesh), "w": shd.batch_sharding(mesh, 2)})
d = jax.devices()  # process 0 holds devices 0 and 1: rows 0-1 and 4-5 of 8, not one block
interleaved = shd.make_mesh((4, 1, 1), devices=[d[0], d[2], d[1], d[3]])
rows = np.arange(16).reshape(8, 2)
batch = shd.place_batch({"ids": rows}, shd.batch_sharding(interleaved, 2))["ids"]
held = sorted(
  int(i[0].start or 0) for i in batch.sharding.addressable_devices_indices_map(rows.shape).values()
)
out = {
  "key_data": shd.to_host(jax.random.key_data(placed["key"])).tolist(),
  "key_typed": jax.dtypes.issubdtype(placed["key"].dtype, jax.dtypes.prng_key),
  "w": shd.to_host(placed["w"]).tolist(),
  "batch": shd.to_host(batch).tolist(),
  "first_rows_held": held,
}
print(json.dumps(out), flush=True)
