import os
import sys

# Tests import shared helpers as `tests.toy`; make the repo root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest


@pytest.fixture(autouse=True)
def bf16_product(monkeypatch):
    """Every test multiplies bf16 in bf16, as the formats' references do, on every CPU: the
    float32 product that CPUs without a bf16 matmul kernel take (dispatch.float32_product)
    sums in another order, and has its own tests (tests/test_float32_product.py), which set
    ``dispatch._float32_faster`` themselves."""
    import torch

    from diffquant.ops.cpu import dispatch
    monkeypatch.setattr(dispatch, "_float32_faster",
                        {torch.bfloat16: False, torch.float16: False})


# the per-build fixture of the kernel tests, and the summary of the builds they ran under
from tests.native_targets import (native_target,  # noqa: E402,F401
                                  pytest_collection_modifyitems, pytest_runtest_logreport,
                                  pytest_terminal_summary)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``): two
    OpenMP threads buy nothing there, and on a busy two-core host each parallel op waits ~10 ms
    for its second thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory):
    """A tiny StableDiffusion3Pipeline saved by diffusers (tests/tiny_diffusers_pipelines.py)."""
    from tests.tiny_diffusers_pipelines import build_sd3_pipeline_dir

    return build_sd3_pipeline_dir(tmp_path_factory.mktemp("sd3") / "pipe")


@pytest.fixture(scope="session")
def wan_dir(tmp_path_factory):
    """A tiny Wan 2.1 WanPipeline saved by diffusers (tests/tiny_diffusers_pipelines.py)."""
    from tests.tiny_diffusers_pipelines import build_wan_pipeline_dir

    return build_wan_pipeline_dir(tmp_path_factory.mktemp("wan") / "pipe")
