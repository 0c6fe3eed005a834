"""Building blocks of the decoder: dense, embedding, norms, RoPE, attention with a KV cache, MLP.

Kernels are stored ``[in, out]``; parameters in ``param_dtype``, matmuls in the compute ``dtype``
with float32 accumulation where it matters (norm statistics, attention softmax, logits).
Attention takes an explicit cache ``(k, v)`` of ``[B, H_kv, S, D]`` arrays (heads-major;
``[B, S, H_kv, D]`` for cuDNN's kernel) and returns the updated one, so decoding is a pure function
that a loop can carry.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ppo_jax.models.config import ModelConfig
from ppo_jax.models.rope import apply_rope, rope_score_gain

_ACT = {
  "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
}


class KVCache(NamedTuple):
  """One layer's cache. k, v: [B, H_kv, S, D] (heads-major, what ``attend`` reads in place), or
  [B, S, H_kv, D] with ``attention="cudnn"`` (what cuDNN's kernel reads); the compute dtype."""

  k: jax.Array
  v: jax.Array


class LoRAParam(nnx.Param):
  """A low-rank adapter's weights: a variable type of its own, so ``nnx.split`` can separate the
  adapters (trained) from the base weights (frozen, shared with the reference policy)."""


class Dense(nnx.Module):
  """``y = x W (+ b)`` with ``kernel: [in, out]``, and optionally a LoRA adapter.

  With ``lora_rank = r > 0``: ``y = x W + (α/r)·(x A) B (+ b)``, ``A: [in, r]`` Gaussian with
  std ``1/√in``, ``B: [r, out]`` zero, so the adapter starts as the identity change (Hu et al.
  2021, https://arxiv.org/abs/2106.09685). Zero adapters give the base layer exactly.
  """

  def __init__(
    self,
    d_in: int,
    d_out: int,
    *,
    bias: bool,
    std: float,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
  ):
    init = jax.nn.initializers.normal(std) if std > 0 else jax.nn.initializers.zeros
    self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), param_dtype))
    self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype)) if bias else None
    if lora_rank:  # each attribute assigned once: NNX fixes a first None as static
      a = jax.nn.initializers.normal(d_in**-0.5)(rngs.params(), (d_in, lora_rank), param_dtype)
      self.lora_a = LoRAParam(a)
      self.lora_b = LoRAParam(jnp.zeros((lora_rank, d_out), param_dtype))
    else:
      self.lora_a = self.lora_b = None
    self.lora_scale = lora_alpha / lora_rank if lora_rank else 0.0
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    lead = x.shape[:-1]
    # Rows flattened to [N, in]: the weight gradient becomes one [in, N]·[N, out] product. With
    # [B, T, in] operands autodiff contracts two dims, and XLA:CPU then fuses the transpose it
    # needs into long element-wise chains (the backward ran 1.4× slower; bench/ppo_workload.py).
    x = jnp.asarray(x, self.dtype).reshape(-1, x.shape[-1])
    y = x @ jnp.asarray(self.kernel[...], self.dtype)
    if self.lora_a is not None:
      low = x @ jnp.asarray(self.lora_a[...], self.dtype)
      y = y + self.lora_scale * (low @ jnp.asarray(self.lora_b[...], self.dtype))
    if self.bias is not None:
      y = y + jnp.asarray(self.bias[...], self.dtype)
    return y.reshape(*lead, y.shape[-1])


class Embed(nnx.Module):
  """Token (or position) embedding table ``[num, features]``; ``attend`` is the tied unembedding."""

  def __init__(self, num: int, features: int, *, std: float, dtype, param_dtype, rngs: nnx.Rngs):
    self.embedding = nnx.Param(
      jax.nn.initializers.normal(std)(rngs.params(), (num, features), param_dtype)
    )
    self.dtype = dtype

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(jnp.asarray(self.embedding[...], self.dtype), ids, axis=0)

  def attend(self, x: jax.Array) -> jax.Array:
    """``x Eᵀ`` in float32: logits over the table's rows."""
    table = jnp.asarray(self.embedding[...], self.dtype)
    return jnp.einsum(
      "...d,vd->...v", jnp.asarray(x, self.dtype), table, preferred_element_type=jnp.float32
    )


class Norm(nnx.Module):
  """LayerNorm (``rms=False``: GPT-2) or RMSNorm (``rms=True``: Llama), statistics in float32.

  ``offset`` (Gemma): the weight ``w`` starts at 0 and scales by ``1 + w``, in float32.
  ``f32_scale`` (OLMo): the weight scales in float32, before the cast.
  """

  def __init__(
    self,
    features: int,
    *,
    eps: float,
    rms: bool,
    dtype,
    param_dtype,
    offset=False,
    f32_scale=False,
  ):
    init = jnp.zeros if offset else jnp.ones
    self.scale = nnx.Param(init((features,), param_dtype))
    self.bias = None if rms else nnx.Param(jnp.zeros((features,), param_dtype))
    self.eps, self.rms, self.dtype, self.offset = eps, rms, dtype, offset
    self.f32_scale = f32_scale

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    if self.rms:
      y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
      if self.offset or self.f32_scale:  # as Gemma and OLMo: scale in float32, then cast
        w = self.scale[...].astype(jnp.float32)
        return (y * (1.0 + w if self.offset else w)).astype(self.dtype)
      # As Llama: normalise in float32, cast, then scale in the compute dtype.
      return jnp.asarray(self.scale[...], self.dtype) * y.astype(self.dtype)
    mean = jnp.mean(x32, -1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def attend(
  q_BxTxHxD: jax.Array,
  k: jax.Array,
  v: jax.Array,
  allowed_BxTxS: jax.Array,
  *,
  heads_major: bool,
  scale: float | None = None,
  softcap: float | None = None,
) -> jax.Array:
  """``softmax(q kᵀ / √D, masked) v`` with grouped queries (H = G · H_kv); returns [B, T, H, D].

  ``k``, ``v``: [B, S, H_kv, D], or [B, H_kv, S, D] with ``heads_major`` (the KV cache's layout).
  Scores and softmax in float32; disallowed keys get float32's most negative finite value, so a
  row with no allowed key averages uniformly instead of turning into nan (the trunk lets every
  query see its own slot, so none of its rows is empty).
  ``scale`` replaces 1/√D; with ``softcap`` c the scores become c·tanh(scores / c) before the
  mask (Gemma 2).
  """
  B, T, H, D = q_BxTxHxD.shape
  kv_heads = k.shape[1] if heads_major else k.shape[2]
  kv_dims = "bksd" if heads_major else "bskd"
  q = q_BxTxHxD.reshape(B, T, kv_heads, H // kv_heads, D)
  scores = jnp.einsum(f"btkgd,{kv_dims}->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores * (1 / math.sqrt(D) if scale is None else scale)
  if softcap is not None:
    scores = softcap * jnp.tanh(scores / softcap)
  scores = jnp.where(allowed_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum(f"bkgts,{kv_dims}->btkgd", probs, v).reshape(B, T, H, D)


def fused_attend(
  q_BxTxHxD: jax.Array,
  k_BxSxKxD: jax.Array,
  v_BxSxKxD: jax.Array,
  allowed_BxTxS: jax.Array,
  *,
  implementation: str,
  scale: float | None = None,
) -> jax.Array:
  """``attend`` through ``jax.nn.dot_product_attention`` (keys [B, S, H_kv, D]); returns
  [B, T, H, D].

  ``implementation="cudnn"``: cuDNN's fused flash attention (Dao et al. 2022, "FlashAttention"),
  which never writes the [T, S] scores to memory; NVIDIA GPUs, bf16 or fp16 only. ``"xla"``: the
  same call lowered by XLA on any device (what the CPU tests compare with ``attend``).
  """
  if implementation == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(
      f"model attention 'cudnn' needs an NVIDIA GPU, and this process runs on "
      f"{jax.default_backend()}: use attention 'xla'"
    )
  return jax.nn.dot_product_attention(
    q_BxTxHxD,
    k_BxSxKxD,
    v_BxSxKxD,
    mask=allowed_BxTxS[:, None],
    scale=scale,
    implementation=implementation,
  )


# ``ModelConfig.attention`` values run by ``jax.nn.dot_product_attention``, and its implementation.
FUSED = {"cudnn": "cudnn"}


class Attention(nnx.Module):
  """Causal grouped-query self-attention over a KV cache (multi-head when H_kv = H).

  With ``cfg.qk_norm`` (Qwen3, Gemma 3), queries and keys pass an RMSNorm over each head's ``D``
  features (weights shared by the heads) before RoPE: ``q = RoPE(RMSNorm(x W_q))``, and ``k``
  alike; OLMo's RMSNorm spans the whole projection, ``H · D`` features (``H_kv · D`` for keys).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, out_std: float, local: bool = False):
    d, h, hkv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    lora = cfg.lora_kw
    std = cfg.initializer_range
    self.q = Dense(d, h * hd, bias=cfg.qkv_bias, std=std, **kw, **lora("q"))
    self.k = Dense(d, hkv * hd, bias=cfg.qkv_bias, std=std, **kw, **lora("k"))
    self.v = Dense(d, hkv * hd, bias=cfg.qkv_bias, std=std, **kw, **lora("v"))
    self.o = Dense(h * hd, d, bias=cfg.o_bias, std=out_std, **kw, **lora("o"))
    norm = lambda width: Norm(
      width,
      eps=cfg.norm_eps,
      rms=True,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      offset=cfg.is_gemma,
      f32_scale=cfg.is_olmo,
    )
    widths = (hd, hd) if cfg.qk_norm else (h * hd, hkv * hd) if cfg.is_olmo else None
    self.q_norm, self.k_norm = (None, None) if widths is None else map(norm, widths)
    self.cfg = cfg
    # 1/√D (Gemma: 1/√query_pre_attn_scalar), times YaRN's gain where this layer's RoPE has it.
    base = hd**-0.5 if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar**-0.5
    gain = 1.0 if cfg.is_gpt2 else rope_score_gain(cfg, local=local)
    self.scale = None if gain == 1.0 and cfg.query_pre_attn_scalar is None else base * gain

  def __call__(
    self, x_BxTxD, positions_BxT, allowed_BxTxS, cache: KVCache | None, cache_index, inv_freq
  ) -> tuple[jax.Array, KVCache]:
    cfg = self.cfg
    B, T, _ = x_BxTxD.shape
    q, k, v = self.q(x_BxTxD), self.k(x_BxTxD), self.v(x_BxTxD)
    if cfg.is_olmo:  # OLMo: all heads' queries normalised together, and keys alike
      q, k = self.q_norm(q), self.k_norm(k)
    q = q.reshape(B, T, cfg.num_heads, cfg.head_dim)
    k = k.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:  # Qwen3, Gemma 3: each head's query and key normalised, rotated
      q, k = self.q_norm(q), self.k_norm(k)
    if not cfg.is_gpt2:
      q, k = apply_rope(q, positions_BxT, inv_freq), apply_rope(k, positions_BxT, inv_freq)
    fused = FUSED.get(cfg.attention)  # None: ppo_jax's own ``attend``
    scale = self.scale
    own = dict(scale=scale, softcap=cfg.attn_logit_softcap)  # ``attend``'s options
    new_cache = None
    if cache is not None:  # write this call's keys at [cache_index, cache_index + T) of the cache
      # Heads-major for ``attend``, so both its products read the cache in place: stored
      # [B, S, H_kv, D], XLA transposed all of it on every decode step (10–15 % of decode time on
      # CPU). cuDNN's kernel takes [B, S, H_kv, D] as it is.
      put = lambda c, x: jax.lax.dynamic_update_slice_in_dim(
        c, (x if fused else x.transpose(0, 2, 1, 3)).astype(c.dtype), cache_index, 1 if fused else 2
      )
      new_cache = KVCache(put(cache.k, k), put(cache.v, v))
    if cache is None and fused:
      out = fused_attend(q, k, v, allowed_BxTxS, implementation=fused, scale=scale)
    elif cache is None:
      out = attend(q, k, v, allowed_BxTxS, heads_major=False, **own)
    elif isinstance(cache_index, int) and cache_index == 0:
      # A prefill (a write at the static slot 0): a query may only see this call's keys, so attend
      # over those T, not over all S slots of the cache (empty past T). ``attend`` whatever
      # ``cfg.attention``: left padding leaves queries with no key at all, which it averages.
      k, v = k.astype(new_cache.k.dtype), v.astype(new_cache.v.dtype)  # what decoding reads
      out = attend(q, k, v, allowed_BxTxS[..., :T], heads_major=False, **own)
    elif fused:  # decoding with cuDNN: one query per row over the cache (bench/decode_attention.py)
      out = fused_attend(
        q, new_cache.k, new_cache.v, allowed_BxTxS, implementation=fused, scale=scale
      )
    else:  # decoding: read the cache
      out = attend(q, new_cache.k, new_cache.v, allowed_BxTxS, heads_major=True, **own)
    return self.o(out.reshape(B, T, -1)), new_cache


class Mlp(nnx.Module):
  """``down(act(up x))`` (GPT-2) or SwiGLU ``down(silu(gate x) ⊙ up x)`` (Llama family)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, out_std: float):
    d, f = cfg.hidden_size, cfg.intermediate_size
    kw = dict(bias=cfg.mlp_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.gate = (
      Dense(d, f, std=cfg.initializer_range, **kw, **cfg.lora_kw("gate"))
      if "gate" in cfg.projections
      else None
    )
    self.up = Dense(d, f, std=cfg.initializer_range, **kw, **cfg.lora_kw("up"))
    self.down = Dense(f, d, std=out_std, **kw, **cfg.lora_kw("down"))
    self.act = _ACT[cfg.activation]

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.act(self.up(x)) if self.gate is None else self.act(self.gate(x)) * self.up(x)
    return self.down(h)


class Block(nnx.Module):
  """Pre-norm residual block: ``x + attn(norm x)``, then ``x + mlp(norm x)``; Gemma normalises
  each sublayer's output too: ``x + post_norm(attn(norm x))``, and the MLP alike; OLMo only
  that: ``x + post_norm(attn(x))``."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, layer: int = 0):
    kw = dict(
      eps=cfg.norm_eps,
      rms=not cfg.is_gpt2,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      offset=cfg.is_gemma,
      f32_scale=cfg.is_olmo,
    )
    # GPT-2 scales the residual projections' init by 1/√(2L) (Radford et al. 2019).
    out_std = cfg.initializer_range / (math.sqrt(2 * cfg.num_layers) if cfg.is_gpt2 else 1.0)
    pre = lambda: None if cfg.is_olmo else Norm(cfg.hidden_size, **kw)
    post = lambda: Norm(cfg.hidden_size, **kw) if cfg.is_gemma or cfg.is_olmo else None
    self.attn_norm, self.attn_post_norm = pre(), post()
    self.attn = Attention(cfg, rngs=rngs, out_std=out_std, local=cfg.sliding(layer))
    self.mlp_norm, self.mlp_post_norm = pre(), post()
    self.mlp = Mlp(cfg, rngs=rngs, out_std=out_std)

  def __call__(self, x, positions, allowed, cache, cache_index, inv_freq):
    norm = lambda n, x: x if n is None else n(x)
    h, cache = self.attn(norm(self.attn_norm, x), positions, allowed, cache, cache_index, inv_freq)
    x = x + norm(self.attn_post_norm, h)
    h = self.mlp(norm(self.mlp_norm, x))
    x = x + norm(self.mlp_post_norm, h)
    return x, cache
