import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def digit_tasks():
    from lightning_cskl.data import split_digits

    return split_digits(n_tasks=5, seed=0)
