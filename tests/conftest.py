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


from tests.native_targets import native_target  # noqa: E402,F401  (a fixture for every module)
