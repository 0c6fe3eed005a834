"""Flax NNX decoders (GPT-2, Llama, Qwen2, Qwen3, Mistral, Gemma 2 and 3), Hugging Face
checkpoints in and out."""

from ppo_jax.models.config import ModelConfig
from ppo_jax.models.hf import from_pretrained, read_safetensors, save_pretrained
from ppo_jax.models.hf_config import read_generation_config
from ppo_jax.models.transformer import (
  CausalLM,
  RewardModel,
  ScalarHead,
  Transformer,
  ValueModel,
  last_token_index,
  positions_from_mask,
)

__all__ = [
  "CausalLM",
  "ModelConfig",
  "RewardModel",
  "ScalarHead",
  "Transformer",
  "ValueModel",
  "from_pretrained",
  "last_token_index",
  "positions_from_mask",
  "read_generation_config",
  "read_safetensors",
  "save_pretrained",
]
