"""Model FLOPs and bytes of the decoder configurations (2 FLOPs per multiply-add), and the
shapes the benchmarks share."""

from __future__ import annotations

from ppo_jax.models import ModelConfig


def matmul_params_per_layer(cfg: ModelConfig) -> int:
  """Weights one token multiplies per layer: q, k, v, o and the MLP (2 or 3 matrices)."""
  d, hd = cfg.hidden_size, cfg.head_dim
  attn = d * cfg.num_heads * hd * 2 + d * cfg.num_kv_heads * hd * 2
  mlp = (2 if cfg.is_gpt2 else 3) * d * cfg.intermediate_size
  return attn + mlp


def forward_flops(cfg: ModelConfig, tokens: int, context: float, *, lm_head_tokens: int) -> float:
  """FLOPs of one forward pass over ``tokens`` tokens that attend on average to ``context``
  positions, with the unembedding applied to ``lm_head_tokens`` of them (0: a value or reward
  model). Per token: 2·(matmul weights) + 4·L·H·d_head·context (scores and mixing).

  For GPT-2 (H·d_head = d, MLP 4d) the matmul term is the usual 24·L·d² per token.
  """
  L = cfg.num_layers
  per_token = 2 * L * matmul_params_per_layer(cfg) + 4 * L * cfg.num_heads * cfg.head_dim * context
  return tokens * per_token + lm_head_tokens * 2 * cfg.hidden_size * cfg.vocab_size


def decode_step_bytes(cfg: ModelConfig, batch: int, context: float, *, itemsize: int) -> float:
  """Bytes one decode step must read at least: every matmul weight and the unembedding once,
  and the keys and values of ``context`` cached positions for each of ``batch`` rows."""
  L, d = cfg.num_layers, cfg.hidden_size
  weights = L * matmul_params_per_layer(cfg) + cfg.vocab_size * d
  kv = batch * context * L * 2 * cfg.num_kv_heads * cfg.head_dim
  return (weights + kv) * itemsize


def llama_1b(**kw) -> ModelConfig:
  """Llama 3.2 1B's shape: 16 layers, width 2048, 32 heads over 8 KV heads, MLP 8192, vocab
  128256, tied embeddings (1.24 B parameters)."""
  return ModelConfig.llama(
    vocab_size=128256,
    hidden_size=2048,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    intermediate_size=8192,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
    **kw,
  )
