"""The supervised stages' step count: epochs over the training rows in batches of the size drawn."""

import pytest

from ppo_jax.supervised import SupervisedHparams


@pytest.mark.parametrize(
  "epochs,batch_size,n,steps",
  [
    (3, 32, 10, 3),  # fewer rows than a batch: batches of all 10 rows, three of them
    (3, 32, 64, 6),
    (1.5, 32, 64, 3),
    (1, 32, 65, 3),  # the last step reads into the next epoch
    (0.01, 32, 64, 1),  # at least one step
  ],
)
def test_steps_are_epochs_over_the_rows(epochs, batch_size, n, steps):
  assert SupervisedHparams(epochs=epochs, batch_size=batch_size).steps(n) == steps
