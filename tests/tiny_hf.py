"""Tiny random Hugging Face checkpoints, made with torch at test time (nothing is downloaded).

An init scale of 0.2 (HF's default is 0.02) keeps logits far from uniform, so a comparison of
logits or greedy tokens has teeth; norm scales and biases are perturbed from their constant init
for the same reason (a map that swapped two of them would otherwise load the same numbers).
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import transformers as tf

VOCAB, EOS, PAD = 64, 5, 0
_COMMON = dict(
  vocab_size=VOCAB, initializer_range=0.2, eos_token_id=EOS, bos_token_id=2, pad_token_id=PAD
)
_LLAMA_LIKE = dict(
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  max_position_embeddings=64,
  **_COMMON,
)

CONFIGS = {
  "gpt2": lambda: tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=48, **_COMMON),
  # A head of its own (GPT-2 checkpoints are tied by default).
  "gpt2_untied": lambda: tf.GPT2Config(
    n_layer=2, n_embd=32, n_head=4, n_positions=48, tie_word_embeddings=False, **_COMMON
  ),
  # GQA (4 query heads over 2 KV heads), untied head, Llama 3.1 RoPE scaling with a short
  # original context so all three frequency bands (kept, interpolated, divided) occur.
  "llama3": lambda: tf.LlamaConfig(
    num_key_value_heads=2,
    tie_word_embeddings=False,
    rope_parameters={
      "rope_type": "llama3",
      "rope_theta": 500000.0,
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8,
    },
    **_LLAMA_LIKE,
  ),
  "qwen2": lambda: tf.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **_LLAMA_LIKE),
  # Per-head q/k RMSNorm, head_dim 16 ≠ hidden/heads, untied head.
  "qwen3": lambda: tf.Qwen3Config(
    num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, **_LLAMA_LIKE
  ),
  # One KV head, head_dim 16 ≠ hidden/heads, and a sliding window shorter than the sequences.
  "mistral": lambda: tf.MistralConfig(
    num_key_value_heads=1, head_dim=16, sliding_window=4, **_LLAMA_LIKE
  ),
  # Gemma 2: head_dim 16 ≠ hidden/heads, scores scaled by 1/√24 (not 1/√16), a window of 4 on the
  # even layers, and soft caps low enough to bite at this init.
  "gemma2": lambda: tf.Gemma2Config(
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=24,
    sliding_window=4,
    attn_logit_softcapping=5.0,
    final_logit_softcapping=3.0,
    **_LLAMA_LIKE,
  ),
  # Gemma 3: per-head q/k norms (scaled by 1 + w), a window of 4 on all layers but every third,
  # with a RoPE base of their own; the others' RoPE linearly scaled.
  "gemma3": lambda: tf.Gemma3TextConfig(
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=4,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    rope_parameters={
      "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 8.0},
      "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
    },
    **{**_LLAMA_LIKE, "num_hidden_layers": 3},
  ),
  # OLMo 2: norms after the sublayers only, q/k RMSNorms over all heads (widths 32 and 16).
  "olmo2": lambda: tf.Olmo2Config(num_key_value_heads=2, **_LLAMA_LIKE),
  # OLMo 3: as OLMo 2, with a window of 4 on all layers but the third, and a RoPE base of their
  # own; the third's RoPE YaRN-scaled from 8 positions (its first frequency kept, the others
  # divided by 8, its scores × 1.21²).
  "olmo3": lambda: tf.Olmo3Config(
    num_key_value_heads=2,
    sliding_window=4,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    rope_parameters={
      "full_attention": {
        "rope_type": "yarn",
        "rope_theta": 500_000.0,
        "factor": 8.0,
        "original_max_position_embeddings": 8,
      },
      "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
    },
    **{**_LLAMA_LIKE, "num_hidden_layers": 3},
  ),
}


def make(
  name: str,
  folder: pathlib.Path,
  *,
  seed: int = 0,
  kind: str = "causal_lm",
  dtype: torch.dtype = torch.float32,
  max_shard_size: str | None = None,
  **config_changes,
):
  """Saves a random ``name`` model (its config with ``config_changes``) under ``folder`` and
  returns the torch model (eval mode)."""
  torch.manual_seed(seed)
  cfg = CONFIGS[name]()
  for key, value in config_changes.items():
    setattr(cfg, key, value)
  if kind == "causal_lm":
    model = tf.AutoModelForCausalLM.from_config(cfg)
  else:
    cfg.num_labels = 1
    model = tf.AutoModelForSequenceClassification.from_config(cfg)
  with torch.no_grad():  # norm scales start at 1 and biases at 0: a swap of two would not show
    for param in model.parameters():
      if param.ndim == 1 and bool((param == param[0]).all()):
        param.add_(0.2 * torch.randn_like(param))
  model = model.to(dtype).eval()
  kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(str(folder), **kw)
  return model


def batch(seed: int = 0, B: int = 3, T: int = 9, left_pad=(0, 3, 5)):
  """Random ids [B, T] (no EOS) and a left-padding mask; padded slots hold PAD."""
  ids = np.random.default_rng(seed).integers(EOS + 1, VOCAB, size=(B, T))
  mask = np.ones((B, T), np.int64)
  for b, n in enumerate(left_pad):
    mask[b, :n] = 0
  return np.where(mask > 0, ids, PAD), mask


def torch_logits(model, ids, mask=None):
  """HF logits, given the positions ppo_jax uses (cumsum of the mask − 1)."""
  with torch.no_grad():
    if mask is None:
      out = model(torch.tensor(ids))
    else:
      pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
      out = model(
        torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)
      )
  return out.logits.float().numpy()
