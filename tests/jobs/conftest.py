"""Fixtures shared by the tests of jobs/."""

from __future__ import annotations

import os
import socket

import pytest


@pytest.fixture(scope="session")
def gloo_world_of_one():
    """A one-rank gloo process group, as Ray Train sets up on a CPU worker, for a real DeepSpeed engine here.
    One per test session: DeepSpeed caches the group it first sees for the life of the process, so a second group
    (another module's) would be 'not registered'."""
    import torch.distributed as dist

    from jobs.train import _disable_deepspeed_shm_comm

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "1", "LOCAL_SIZE": "1", "DS_ACCELERATOR": "cpu"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        dist.init_process_group("gloo", rank=0, world_size=1)
        _disable_deepspeed_shm_comm()
        yield
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray for one test module; its GCS address (modules that need another Ray define their own)."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
