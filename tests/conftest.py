import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def digit_tasks():
    from lightning_cskl.data import split_digits

    return split_digits(n_tasks=5, seed=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every test module runs on one torch thread: tiny models train fastest that way, and stay fast when other
    processes share the 2 cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
