"""RLOO on the default experiment's task: the same SFT and reward model, no critic.

Each prompt gets ``group_size`` responses; a response's advantage is its score minus the mean
score of the other responses to the same prompt (REINFORCE leave-one-out; Kool et al. 2019,
Ahmadian et al. 2024). As in RLOO, the KL to the SFT policy is a penalty on the score (k1, summed
over the response). The update is PPO's clipped surrogate on these advantages. Everything else is
``experiments/default.py``.

  python -m ppo_jax.main --config=experiments/rloo.py --workdir=runs/rloo
  python -m ppo_jax.main --config=experiments/rloo.py:smoke --workdir=runs/rloo_smoke
"""

import pathlib

from ppo_jax.config import load_experiment


def get_config(arg: str | None = None):
  config = load_experiment(pathlib.Path(__file__).with_name("default.py"), arg)
  config.algo = "rloo"
  config.ppo.group_size = 4  # ppo.batch_size responses = batch_size / 4 prompts × 4
  if arg == "smoke":  # 16 prompts × 4 responses: as many prompts per step as PPO's smoke sees
    config.ppo.batch_size = 64
    config.ppo.iterations = 20
  config.ppo.kl_mode = "reward"
  config.ppo.kl_kind = "k1"
  return config
