"""utils.device.resolve_device: the one reading of `device=` for every CLI (auto, explicit names, one-line errors)."""
import pytest
import torch

from utils.device import resolve_device
from utils.errors import UserError


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for key in ("SLURM_LOCALID", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


def test_auto_is_the_cpu_without_a_gpu(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_requested_cuda_without_a_gpu_is_one_line(no_gpu, name):
    with pytest.raises(UserError, match=rf"^device={name}: no CUDA GPU is available here$"):
        resolve_device(name)


@pytest.mark.parametrize("name, message", [("gpu0", "not a device"), ("cuda:x", "not a device"),
                                           ("meta", "not supported")])
def test_unknown_names_are_refused(no_gpu, name, message):
    with pytest.raises(UserError, match=rf"^device={name}: {message}"):
        resolve_device(name)


def test_auto_picks_the_tasks_own_gpu(four_gpus, monkeypatch):
    """With 4 tasks on a 4-GPU node each task sees all 4 GPUs; auto must pick the task's own."""
    alone = resolve_device("auto")
    assert alone.type == "cuda" and alone.index is None
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    monkeypatch.setenv("SLURM_LOCALID", "6")  # Slurm's id wins; more tasks than GPUs wrap around
    assert resolve_device("auto") == torch.device("cuda", 2)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)  # an explicit choice stays
    with pytest.raises(UserError, match=r"^device=cuda:4: this machine has 4 CUDA GPU\(s\)$"):
        resolve_device("cuda:4")
