import os

import pytest
import torch

os.environ.setdefault("DLGKIT_PROGRESS", "0")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
