"""DPO on the default experiment's task: the same SFT policy and preference pairs, no reward model.

The SFT policy (also the reference) is trained directly on the preference pairs the reward model
would have learnt from, with ``preference.dpo_loss`` (Rafailov et al. 2023); the reference
log-probabilities are computed once. The policy is then evaluated like the RL stages: its samples
on held-out prompts, their gold score and KL to the reference. Everything else is
``experiments/default.py``.

  python -m ppo_jax.main --config=experiments/dpo.py --workdir=runs/dpo
  python -m ppo_jax.main --config=experiments/dpo.py:smoke --workdir=runs/dpo_smoke
"""

import pathlib

from ppo_jax.config import load_experiment


def get_config(arg: str | None = None):
  config = load_experiment(pathlib.Path(__file__).with_name("default.py"), arg)
  config.algo = "dpo"
  config.rm.enabled = False  # DPO needs no reward model
  config.dpo.epochs = 2.0
  config.dpo.batch_size = 64
  config.dpo.beta = 0.1
  config.dpo.optim.lr = 1e-3
  if arg == "smoke":
    config.dpo.epochs = 1.0
    config.dpo.batch_size = 32
    config.data.eval_prompts = 64  # DPO has no rollouts to measure: sample held-out prompts
  return config
