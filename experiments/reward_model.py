"""A reward model alone: the default experiment's SFT, then its Bradley–Terry reward model on the
preference pairs, and stop (``config.stop_after='rm'``): no prompts are read and no policy is
trained on them.

  python -m ppo_jax.main --config=experiments/reward_model.py --workdir=runs/rm
  python -m ppo_jax.main --config=experiments/reward_model.py:smoke --workdir=runs/rm_smoke

On your own data (SFT is skipped without ``data.sft``; ``rm.init='policy'`` starts the reward
model from the SFT policy's trunk, or from ``model.init``'s when SFT is skipped):

  python -m ppo_jax.main --config=experiments/reward_model.py --workdir=runs/rm \\
    --config.task.name=files --config.model.init=/models/Qwen2.5-0.5B \\
    --config.data.preferences=data/preferences.jsonl --config.data.max_prompt_len=256 \\
    --config.data.max_response_len=256

The run writes ``reward_model/`` (a Hugging Face ``*ForSequenceClassification`` folder), its
held-out pairs (``rm_held_out_pairs.jsonl``, for ``ppo-jax rm-eval``) and ``summary.json`` with
the held-out accuracy, margin and loss. The same command with ``--config=experiments/default.py``
(or ``grpo.py``, ``rloo.py``; on your data, with ``--config.data.prompts``) on the same workdir
goes on to the policy from these folders.
"""

import pathlib

from ppo_jax.config import load_experiment


def get_config(arg: str | None = None):
  config = load_experiment(pathlib.Path(__file__).with_name("default.py"), arg)
  config.stop_after = "rm"
  return config
