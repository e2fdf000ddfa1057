"""A site's GPU resource manager that uses the GPUs the site has, found when the site starts.

FLARE's ``GPUResourceManager`` needs a fixed ``num_of_gpus`` and ``mem_per_gpu_in_GiB`` and fails at
start when the machine has fewer. A kit is provisioned before anyone knows a hospital's hardware,
so the templates say ``"auto"``: every GPU the site's processes can see (``nvidia-smi``, narrowed by
``CUDA_VISIBLE_DEVICES``), and the smallest of their memories. On a machine without GPUs that is 0
GPUs, and jobs that ask for none run as usual. A number (project.yml client property ``num_gpus`` /
``mem_per_gpu_in_GiB``) is passed through to FLARE's own checks.
"""

from __future__ import annotations

from nvflare.app_common.resource_managers.gpu_resource_manager import GPUResourceManager, _get_managed_host_gpu_ids
from nvflare.fuel.utils.gpu_utils import get_host_gpu_ids, get_host_gpu_memory_total

AUTO = "auto"


def visible_gpus() -> tuple[int, float]:
    """(number of GPUs this process may use, smallest memory among them in GiB); (0, 0.0) without GPUs."""
    host_ids = get_host_gpu_ids()
    managed = _get_managed_host_gpu_ids(host_ids)
    if not managed:
        return 0, 0.0
    memory = get_host_gpu_memory_total()  # MiB, in nvidia-smi index order
    by_id = {gpu_id: memory[i] for i, gpu_id in enumerate(host_ids) if i < len(memory)}
    return len(managed), min(by_id.get(g, 0) for g in managed) / 1024.0


class SiteGPUResourceManager(GPUResourceManager):
    def __init__(self, num_of_gpus: int | str = AUTO, mem_per_gpu_in_GiB: float | str = AUTO,
                 expiration_period: int | float = 300, **kwargs):
        """Args:
            num_of_gpus: ``"auto"`` (default: every visible GPU) or a number FLARE checks against the host.
            mem_per_gpu_in_GiB: ``"auto"`` (default: the smallest visible GPU's memory) or a number.
            expiration_period: seconds FLARE holds reserved GPUs for a job that did not start.
            **kwargs: ``num_gpu_key``, ``gpu_mem_key``, ``ignore_host`` of FLARE's GPUResourceManager.
        """
        count, memory = visible_gpus() if AUTO in (num_of_gpus, mem_per_gpu_in_GiB) else (0, 0.0)
        for name, value in (("num_of_gpus", num_of_gpus), ("mem_per_gpu_in_GiB", mem_per_gpu_in_GiB)):
            if isinstance(value, str) and value != AUTO:
                raise ValueError(f"SiteGPUResourceManager: {name} must be a number or '{AUTO}', got '{value}' "
                                 f"(local/resources.json)")
        num_of_gpus = count if num_of_gpus == AUTO else num_of_gpus
        mem_per_gpu_in_GiB = memory if mem_per_gpu_in_GiB == AUTO else mem_per_gpu_in_GiB
        super().__init__(num_of_gpus=num_of_gpus, mem_per_gpu_in_GiB=mem_per_gpu_in_GiB,
                         expiration_period=expiration_period, **kwargs)
        self.num_of_gpus = num_of_gpus
        self.mem_per_gpu_in_GiB = mem_per_gpu_in_GiB
