"""Import timm on machines whose torchvision wheel cannot load its C extension.

The only wheel of torchvision on PyPI is a CUDA build; with the CPU build of torch its `_C.so` does not load,
and `torchvision._meta_registrations` then fails registering fake kernels for `torchvision::nms`/`qnms`, which
breaks `import timm`. Defining those two operator schemas first lets torchvision import (without its C ops,
which timm's ViT does not use).
"""

from __future__ import annotations

import importlib
import sys


def import_timm():
    try:
        return importlib.import_module("timm")
    except RuntimeError as e:
        if "torchvision" not in str(e):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith(("torchvision.", "timm"))]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")  # noqa: F841  kept alive by the dispatcher registry
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _keep.append(lib)
    return importlib.import_module("timm")


_keep: list = []


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def timm():
    return import_timm()


@pytest.fixture(autouse=True)
def _one_thread():
    """The models tests run many small ops; on a shared 2-core machine a second OpenMP thread that gets
    descheduled makes each op wait (measured 10-30x slower small matmuls under load). One thread is steady."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
