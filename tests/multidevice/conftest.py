"""Runs on 8 simulated CPU devices (XLA_FLAGS set by tests/test_sharding.py before JAX starts)."""

import jax
import pytest


@pytest.fixture(scope="session", autouse=True)
def eight_devices():
  if jax.device_count() != 8:
    pytest.fail(
      f"tests/multidevice needs 8 devices, found {jax.device_count()}: run it through "
      "tests/test_sharding.py::test_multidevice_suite"
    )
