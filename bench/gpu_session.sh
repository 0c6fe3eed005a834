#!/usr/bin/env bash
# Issue 7's GPU figures in one device call (the H200: train-step MFU and decode against the HBM
# roofline, for a 1B Llama in bf16). Run it with the device tool from the repository root:
#
#   run(command="bash bench/gpu_session.sh", timeout_s=600)
#
# It needs nothing installed: the device image's python3 has jax (CUDA), flax and optax, and
# ppo_jax is read from this checkout. Should `import flax.nnx` fail there, carry flax as a wheel:
# here, `echo /.whl/ >> .git/info/exclude` and `python3 -m pip download --no-deps
# --only-binary=:all: --python-version 3.12 -d .whl flax==0.12.8`, then pass carry=[".whl"]; the
# script installs what it finds in .whl when the image's own flax does not import.
#
# Everything lands in $OUT (the device tool brings it back): env.txt, accelerator.txt (the 1B
# run: decode, then the train step), decode_hlo.txt (the compiled sampler, for reading here at
# no device time), accelerator_cudnn.txt (the same with cuDNN's fused attention in the train
# step and in decoding: its decode line against accelerator.txt's is the fused kernel's gain),
# decode_profile.txt (one sampler call's time per kernel family, from a jax.profiler trace, with
# XLA's attention then cuDNN's: where the decode step's time goes), decode_batch.txt (decode at
# batch 64 and 128), decode_lora.txt (decode with rank-16 adapters: its steps should cost the
# plain policy's) and attention.txt (attention forward +
# backward alone: ppo_jax's against cuDNN's fused kernel). Each step has its own time limit, so
# one that hangs leaves the others' figures (about 5 minutes in all on the H200). A dry run on
# the CPU here: `ACCEL_ARGS="--preset tiny" bash bench/gpu_session.sh` (about a minute; the cuDNN
# steps stop there with "needs an NVIDIA GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ppo_jax_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# `python3 bench/x.py` puts bench/ first on sys.path, not the checkout: ppo_jax comes from here.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# The image's own flax first (it matches the image's jax); the carried wheels only if that fails.
if ! python3 -c "import flax.nnx, optax, ppo_jax.rollout" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 - <<'EOF'
import importlib, jax
for name in ("jax", "jaxlib", "flax", "optax", "numpy"):
  mod = importlib.import_module(name)
  print(name, getattr(mod, "__version__", "?"))
print(jax.devices())
import ppo_jax.rollout  # noqa: F401  (fails here, not halfway through a benchmark)
print("ppo_jax imports")
EOF
} 2>&1 | tee "$OUT/env.txt"

echo "== 1B Llama, bf16: decode then train step, ppo_jax's attention (attend, XLA)"
timeout 150 python3 bench/accelerator.py ${ACCEL_ARGS:-} --hlo-out "$OUT/decode_hlo.txt" \
  --profile-out "$OUT/decode_profile.txt" 2>&1 | tee "$OUT/accelerator.txt"

echo "== the same with cuDNN's fused attention (score, update, and the sampler's decode steps)"
rm -f /tmp/decode_profile_cudnn.txt
timeout 150 python3 bench/accelerator.py ${ACCEL_ARGS:-} --attention cudnn \
  --profile-out /tmp/decode_profile_cudnn.txt 2>&1 | tee "$OUT/accelerator_cudnn.txt"
# One file for both profiles: the device tool brings back 8 files at most.
[ -f /tmp/decode_profile_cudnn.txt ] && { echo; echo "== model.attention=cudnn"; cat /tmp/decode_profile_cudnn.txt; } >> "$OUT/decode_profile.txt"

echo "== decode at batch 64 and 128: the weights' bytes per token shrink, the per-step overhead not"
for b in 64 128; do
  timeout 90 python3 bench/accelerator.py ${ACCEL_ARGS:-} --decode-only --batch $b 2>&1
done | tee "$OUT/decode_batch.txt"

echo "== decode of a LoRA policy (rank 16, every projection; folded before the loop) at batch 32"
timeout 75 python3 bench/accelerator.py ${ACCEL_ARGS:-} --decode-only --lora 16 2>&1 \
  | tee "$OUT/decode_lora.txt"

echo "== attention alone at the train step's shapes: attend (XLA) vs cuDNN flash attention"
timeout 45 python3 bench/attention.py ${ACCEL_ARGS:-} 2>&1 | tee "$OUT/attention.txt"
ls -l "$OUT"
