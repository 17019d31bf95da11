import os

import pytest
import torch

# Two cores: keep every test single-threaded and quiet.
torch.set_num_threads(1)
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
