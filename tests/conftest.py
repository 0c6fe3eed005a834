"""Test-wide settings: offline Hugging Face, and the named mask cases as a fixture."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
from cases import MASKS


@pytest.fixture(params=list(MASKS), ids=list(MASKS))
def mask(request) -> np.ndarray:
  return MASKS[request.param]
