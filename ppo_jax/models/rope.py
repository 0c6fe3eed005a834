"""Rotary position embeddings (Su et al. 2021, https://arxiv.org/abs/2104.09864): the inverse
frequencies of each family's RoPE, with linear, Llama-3.1 and YaRN scaling, and their rotation of
queries and keys ("rotate half", as Hugging Face's Llama).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ppo_jax.models.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, *, local: bool = False) -> jax.Array:
  """Inverse frequencies ``θ^(−2i/D)``, with linear, Llama-3.1 or YaRN scaling ([D/2], float32);
  ``local``: the windowed layers' (``cfg.local_rope_theta``, unscaled), where the config has one.

  Llama 3.1 (``rope_type="llama3"``): wavelengths longer than ``L_orig / low_freq_factor`` are
  divided by ``factor``, those shorter than ``L_orig / high_freq_factor`` kept, and those between
  interpolated smoothly (Meta's ``apply_scaling``; as ``transformers``' ``rope_parameters``).

  YaRN (``rope_type="yarn"``; Peng et al. 2023, https://arxiv.org/abs/2309.00071, "NTK-by-parts"):
  frequency ``i`` blends the original ``θ^(−2i/D)`` (weight ``1 − r_i``) and the interpolated
  ``θ^(−2i/D) / factor`` (weight ``r_i``), ``r_i`` a ramp from 0 to 1 between the dimensions
  that turn ``beta_fast`` and ``beta_slow`` times over ``L_orig`` positions (floored and ceiled
  unless ``truncate`` is off); the attention scores gain ``rope_score_gain``.
  """
  d = cfg.head_dim
  if local and cfg.local_rope_theta is not None:
    return 1.0 / (cfg.local_rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  p = dict(cfg.rope_params)
  if cfg.rope_type == "linear":
    return inv / p["factor"]
  if cfg.rope_type == "yarn":
    old_len = p.get("original_max_position_embeddings", cfg.max_position_embeddings)
    factor = p.get("factor", cfg.max_position_embeddings / old_len)
    # The dimension whose wavelength fits ``turns`` times in ``old_len`` positions.
    dim_of = lambda turns: (
      d * math.log(old_len / (turns * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))
    )
    low, high = dim_of(p.get("beta_fast", 32.0)), dim_of(p.get("beta_slow", 1.0))
    if p.get("truncate", 1.0):
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    span = (high - low) or 1e-3  # as transformers: no guard but against 0
    ramp = jnp.clip((jnp.arange(d // 2, dtype=jnp.float32) - low) / span, 0, 1)
    return inv / factor * ramp + inv * (1 - ramp)
  if cfg.rope_type == "llama3":
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)
  return inv


def rope_score_gain(cfg: ModelConfig, *, local: bool = False) -> float:
  """What YaRN multiplies the attention scores by: ``m²``, ``m = 0.1 ln(factor) + 1`` (or the
  config's ``attention_factor``, or DeepSeek's ratio of two such with ``mscale`` and
  ``mscale_all_dim``), as its cos and sin both scale by ``m``; 1 for other RoPEs and for the
  windowed layers that have a RoPE of their own."""
  if cfg.rope_type != "yarn" or (local and cfg.local_rope_theta is not None):
    return 1.0
  p = dict(cfg.rope_params)
  old_len = p.get("original_max_position_embeddings", cfg.max_position_embeddings)
  factor = p.get("factor", cfg.max_position_embeddings / old_len)
  m = p.get("attention_factor")
  if m is None:
    of = lambda scale: 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0
    both = p.get("mscale") and p.get("mscale_all_dim")
    m = of(p["mscale"]) / of(p["mscale_all_dim"]) if both else of(1.0)
  return m * m


def apply_rope(x_BxTxHxD: jax.Array, positions_BxT: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding, "rotate half" layout (Su et al. 2021; as Hugging Face Llama)."""
  angles = positions_BxT[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
  cos, sin = jnp.cos(angles).astype(x_BxTxHxD.dtype), jnp.sin(angles).astype(x_BxTxHxD.dtype)
  x1, x2 = jnp.split(x_BxTxHxD, 2, axis=-1)
  return x_BxTxHxD * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
