"""ops/formats/quanto.py (and cpu/quantize.py's C pass): quanto's weight quantization without
optimum-quanto gives quanto's own codes, scales, shifts and packing, bit for bit, and
quantize-on-load no longer imports it."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffquant.errors import BackendUnavailableError
from diffquant.ops.cpu import quantize as cq
from diffquant.ops.formats import quanto as qm
from diffquant.quantizers import base
from diffquant.quantizers import quanto as qz


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """the raw bytes: float8 and NaN compare by their bits"""
    return t.contiguous().view(torch.uint8)


def weight(n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 0.1
    w[0] = 0.0                                   # a zero row: scale 0, codes from 0 / 0
    w[1, :5] = torch.tensor([3e4, -3e4, 1e-30, -0.0, 2.5e-3])  # far apart, tiny, -0
    w[2] = 0.125                                 # a constant row: max == min
    return w.to(dtype)


@pytest.mark.usefixtures("native_target")  # every build this machine can execute
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("weights_dtype,n,k", [("int8", 37, 96), ("float8", 37, 96),
                                               ("int4", 37, 256), ("int4", 3, 128),
                                               ("int2", 5, 96), ("int4", 6, 100)])
def test_the_pieces_are_quantos_bit_for_bit(dtype, weights_dtype, n, k):
    """3 x 128 in groups of 128: 3 rows, packed into 2 (a short last slice); 6 x 100: no
    group size divides 100 (whole rows); int2 packs 4 rows to a byte."""
    w = weight(n, k, dtype)
    group = qz.group_size_for(weights_dtype, k)
    ours = qz.quantize(w, weights_dtype, group)
    theirs = qz.quantize_with_quanto(w, weights_dtype, group)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and ours[name].shape == theirs[name].shape
        assert torch.equal(bits_of(ours[name]), bits_of(theirs[name])), name


def test_a_single_row_is_left_to_quanto(monkeypatch):
    """quanto quantizes a one-row weight per tensor; that case still goes to quanto itself."""
    w = weight(3, 64, torch.bfloat16)[1:2]
    assert not qm.supported(w, None) and qm.supported(torch.zeros(2, 64), None)
    called = []
    real = qz.quantize_with_quanto
    monkeypatch.setattr(qz, "quantize_with_quanto", lambda *a: called.append(a) or real(*a))
    pieces = qz.quantize(w, "int8", None)
    assert len(called) == 1 and pieces["weight._scale"].numel() == 1


def test_pack_is_quantos_packing():
    codes = torch.randint(0, 16, (7, 5), dtype=torch.uint8)
    packed = qm.pack(codes, 4)
    assert packed.shape == (4, 5)
    assert torch.equal(qm.unpack(packed, 4, 7), codes)


def test_quantize_on_load_does_not_import_optimum_quanto(tmp_path):
    """A fresh interpreter quantizes a model on load with QuantoConfig, runs it, and never
    imports optimum.quanto (~5 s of imports)."""
    code = f"""
import sys, torch
from diffquant import QuantoConfig
from tests.toy import ToyModel, save_toy, toy_input
save_toy({str(tmp_path)!r}, hidden=320)
for wd in ("int8", "int4"):
    m = ToyModel.from_pretrained({str(tmp_path)!r}, quantization_config=QuantoConfig(wd),
                                 torch_dtype=torch.bfloat16)
    assert type(m.proj_in).__name__ == "QuantoLinear", type(m.proj_in)
    with torch.no_grad():
        m(toy_input())
print("imported" if "optimum.quanto" in sys.modules else "not imported")
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "not imported"


def test_a_missing_package_is_named_without_importing_it():
    with pytest.raises(BackendUnavailableError, match=r"'no_such_pkg\.sub'.*diffquant\[extra\]"):
        base.require_installed("no_such_pkg.sub", "extra")
    base.require_installed("optimum.quanto", "quanto")  # installed: no error, no import


@pytest.mark.usefixtures("native_target")  # every build this machine can execute
@pytest.mark.parametrize("weights_dtype", ["int8", "int4", "int2"])
def test_the_c_pass_is_the_torch_ops_with_inf_and_nan(weights_dtype, monkeypatch):
    """bf16 weights go through csrc/quantize.c: the torch ops' codes for rows holding an
    infinity or a NaN too (a NaN makes the row's scale NaN and its codes 0), subnormals, signed
    zeros and zero rows, split over threads (70 rows of groups)."""
    w = weight(70, 256, torch.bfloat16, seed=4)
    w[3, 7], w[4, 0], w[5, 9], w[6, 1:3] = float("inf"), float("-inf"), float("nan"), 1e38
    w[7] = w[7] * 1e-38                          # a row of subnormals: a subnormal scale
    w[8, :4] = torch.tensor([1e-40, -1e-40, -0.0, 0.0])
    w[9] = 0.0                                   # a zero row
    group = qz.group_size_for(weights_dtype, 256)
    assert cq._in_c(w)
    in_c = qz.quantize(w, weights_dtype, group)
    monkeypatch.setattr(cq, "_in_c", lambda t: False)
    ops = qz.quantize(w, weights_dtype, group)
    theirs = qz.quantize_with_quanto(w, weights_dtype, group)
    for name in in_c:
        for other in (ops, theirs):   # NaN scales: the same places (torch's NaN bits vary)
            torch.testing.assert_close(in_c[name], other[name], rtol=0, atol=0, equal_nan=True)


@pytest.mark.usefixtures("native_target")  # every build this machine can execute
@pytest.mark.parametrize("weights_dtype", ["int4", "int2"])
def test_zero_extremes_keep_their_sign_and_all_zero_groups_their_values(weights_dtype):
    """A group whose minimum (or maximum) is a zero, with -0 and +0 in it: the C pass takes
    the first zero, as quanto's amin / amax do, so the shift's bits are quanto's. In a group of
    nothing but zeros of both signs torch's reduction order picks the sign, and the shift's
    zero may have the other sign: the dequantized weight is the same (0 - -0 == 0 - 0)."""
    w = torch.rand(16, 256, generator=torch.Generator().manual_seed(3)) * 0.1
    w[0, 3], w[0, 40] = -0.0, 0.0                # min is zero, -0 met first
    w[1, 3], w[1, 40] = 0.0, -0.0                # +0 met first
    w[2] = -w[2]
    w[2, 5], w[2, 9] = -0.0, 0.0                 # max is zero
    w[3] = -w[3]
    w[3, 5], w[3, 9] = 0.0, -0.0
    w[4, 200], w[4, 130] = -0.0, 0.0             # the row's second group
    w[5] = 0.0
    w[5, ::3] = -0.0                             # all zeros, both signs
    w = w.to(torch.bfloat16)
    group = qz.group_size_for(weights_dtype, 256)
    ours = qz.quantize(w, weights_dtype, group)
    theirs = qz.quantize_with_quanto(w, weights_dtype, group)
    first = 5 * (256 // group)                   # the groups of rows 0-4
    for name in ours:
        a, b = ours[name], theirs[name]
        if name == "weight._shift":
            assert torch.equal(bits_of(a[:first]), bits_of(b[:first]))
            assert torch.equal(a, b)             # values: -0 == 0
        else:
            assert torch.equal(bits_of(a), bits_of(b)), name
