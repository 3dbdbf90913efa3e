"""The trainer lands on its own device: the ``LOCAL_RANK`` that DeepSpeed's engine reads names the trainer's
device (single process, ``model.device``) or the GPU Ray assigned the rank, never device 0 by default.

DeepSpeed's engine turns ``LOCAL_RANK`` into its device with the accelerator's ``device_name(local_rank)``
and moves the model there; the CUDA accelerator's ``device_name`` is a pure string function, so the whole
mapping is checked here on CPU with DeepSpeed's own code.
"""

from __future__ import annotations

import os

import pytest
import torch

from attnrl.errors import ConfigError
from infra.deepspeed_backend import _OWN_PORT, _single_process_env, local_rank_of, visible_index


def _deepspeed_device() -> torch.device:
    """Where DeepSpeed 0.19's engine would put the model for this process's LOCAL_RANK on a CUDA node."""
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    return torch.device(CUDA_Accelerator().device_name(int(os.environ["LOCAL_RANK"])))


@pytest.fixture
def clean_world(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", _OWN_PORT):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("index", [0, 3, 7])
def test_a_single_process_trainer_stays_on_the_configured_gpu(clean_world, index):
    device = torch.device("cuda", index)
    _single_process_env(device)
    assert _deepspeed_device() == device
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"


def test_a_second_backend_in_the_same_process_moves_local_rank_to_its_own_device(clean_world):
    _single_process_env(torch.device("cuda", 7))
    _single_process_env(torch.device("cuda", 2))
    assert _deepspeed_device() == torch.device("cuda", 2)


def test_a_launchers_local_rank_that_names_another_device_is_refused(clean_world, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match=r"device is cuda:7 but LOCAL_RANK is '0'"):
        _single_process_env(torch.device("cuda", 7))
    monkeypatch.setenv("LOCAL_RANK", "7")
    _single_process_env(torch.device("cuda", 7))  # the launcher's world, on the trainer's device


def test_cpu_trainers_take_local_rank_zero():
    assert local_rank_of(torch.device("cpu")) == 0
    with pytest.raises(ValueError, match="name the device index"):
        local_rank_of(torch.device("cuda"))


@pytest.mark.parametrize(("assigned", "visible", "index"), [
    (["5"], "5", 0),  # Ray's default: the actor sees only its GPU
    (["5"], "4,5", 1),  # fractional GPUs of a bundle, several visible
    (["6"], None, 6),  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: every GPU visible
])
def test_a_ray_rank_uses_the_gpu_ray_assigned_it(assigned, visible, index):
    assert visible_index(assigned, visible) == index


def test_a_rank_without_exactly_one_visible_assigned_gpu_is_refused():
    with pytest.raises(ValueError, match="exactly one GPU"):
        visible_index([], "0")
    with pytest.raises(ValueError, match="Ray assigned GPU 3 but CUDA_VISIBLE_DEVICES is '0,1'"):
        visible_index(["3"], "0,1")
