"""The hospitals' GPU resource manager: 'auto' finds the GPUs the site has when it starts."""

import pytest
import torch

from fedmed.deploy.resources import SiteGPUResourceManager, visible_gpus

pytestmark = pytest.mark.unit  # pure and fast: the `pytest -m unit` tier


def test_auto_uses_every_gpu_this_process_can_see():
    manager = SiteGPUResourceManager()  # what the hospital template ships: auto / auto
    assert manager.num_of_gpus == torch.cuda.device_count()
    count, memory = visible_gpus()
    assert count == torch.cuda.device_count()
    if count:
        total = min(torch.cuda.get_device_properties(i).total_memory for i in range(count)) / 2**30
        assert memory == pytest.approx(total, rel=0.05)
        assert manager.mem_per_gpu_in_GiB == memory
    else:
        assert memory == 0.0


def test_a_number_of_gpus_beyond_the_host_fails_with_flares_check():
    with pytest.raises(ValueError, match="exceeds available GPUs"):
        SiteGPUResourceManager(num_of_gpus=torch.cuda.device_count() + 1, mem_per_gpu_in_GiB=0)


def test_a_word_other_than_auto_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="num_of_gpus must be a number or 'auto'"):
        SiteGPUResourceManager(num_of_gpus="all")
