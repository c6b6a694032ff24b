"""ops/native/int4.py: the one-row product of 4-bit weights in groups (csrc/int4.c) is within
bf16 rounding of the exact product and of torch's int4pack kernel, its vector and scalar loops
give the same bits, its layout round-trips, and the few-row path of every 4-bit format uses
it for one row where it has its vector loop (and int4pack otherwise)."""

import pytest
import torch

from diffquant.ops.cpu import gguf as fg
from diffquant.ops.cpu import int4 as f4
from diffquant.ops.cpu import linear as fl
from diffquant.ops.formats import torchao as iq
from diffquant.ops.native import build as native
from diffquant.ops.native import int4 as native_int4
from tests.test_fast_linear import gguf_blocks

BF16 = torch.bfloat16
pytestmark = pytest.mark.usefixtures("native_target")  # every build this machine can execute


def affine4(n, k, group, seed=0):
    """codes [N, K] in 0..15 and bf16 scale/zero [N, K/group] of a typical range"""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = (torch.rand(n, k // group, generator=g) / 8 + 1e-3).to(BF16)
    zero = (torch.randn(n, k // group, generator=g) / 10).to(BF16)
    return codes, scale, zero


def weight(codes, scale, zero, group):
    n, k = codes.shape
    w = (codes.double() - 8).view(n, -1, group) * scale.double().unsqueeze(-1)
    return (w + zero.double().unsqueeze(-1)).view(n, k)


def test_the_layout_round_trips():
    codes, scale, zero = affine4(24, 256, 64)
    packed, sz = native_int4.pack_rows(codes, scale.float(), zero.float())
    assert packed.shape == (24, 128) and packed.dtype == torch.uint8
    assert sz.shape == (24, 4) and sz.dtype == torch.int32
    assert torch.equal(native_int4.unpack_rows(packed), codes)
    s, z = native_int4.scales(sz)
    assert torch.equal(s, scale) and torch.equal(z, zero)
    # element 2i in the low nibble of byte i; the 8th of every 8 stored xor 8
    assert packed[0, 0].item() == codes[0, 0].item() | codes[0, 1].item() << 4
    assert packed[0, 3].item() == codes[0, 6].item() | (codes[0, 7].item() ^ 8) << 4


# K = 96: an odd number of runs of 32 (the loop's tail); 16640: a row past the 4096 values a
# thread widens on its stack and the 1024 run sums it keeps there; 200 rows: split over
# threads at unequal bounds
@pytest.mark.parametrize("n,k,group", [(64, 128, 32), (40, 96, 32), (64, 256, 64),
                                       (200, 512, 256), (96, 3072, 128), (33, 16640, 128),
                                       (48, 384, 128), (40, 192, 64)])  # odd group counts
def test_one_row_is_within_bf16_rounding_and_the_loops_agree(n, k, group):
    codes, scale, zero = affine4(n, k, group)
    packed, sz = native_int4.pack_rows(codes, scale, zero)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(1)).to(BF16)
    y = native_int4.gemv(packed, sz, group, x)
    assert y.dtype == BF16 and y.shape == (1, n)
    assert torch.equal(native_int4.gemv(packed, sz, group, x, portable=True), y)
    w = weight(codes, scale, zero, group)
    exact = x.double() @ w.t()
    bound = x.double().abs() @ w.abs().t() * 2.0**-8 + 1e-30
    assert ((y.double() - exact).abs() <= bound).all()
    int4pack = f4.int4pack_matmul(n, group, [f4.pack_int4_cpu(codes, scale, zero, group)])(x)
    assert ((y.double() - int4pack.double()).abs() <= 2 * bound).all()


@pytest.mark.parametrize("value", [2.0**64, float("inf"), float("nan")])
def test_a_row_it_could_overflow_on_is_left_to_int4pack(value):
    n, k, group = 48, 128, 32
    codes, scale, zero = affine4(n, k, group)
    packed, sz = native_int4.pack_rows(codes, scale, zero)
    x = torch.randn(1, k).to(BF16)
    x[0, 37] = value
    assert native_int4.gemv(packed, sz, group, x) is None


def test_a_large_but_safe_row_stays_close():
    n, k, group = 48, 128, 32
    codes, scale, zero = affine4(n, k, group)
    packed, sz = native_int4.pack_rows(codes, scale, zero)
    x = (torch.randn(1, k) * 2.0**60).to(BF16)  # the scaled lane sums reach ~2^95: no overflow
    y = native_int4.gemv(packed, sz, group, x)
    w = weight(codes, scale, zero, group)
    exact = x.double() @ w.t()
    assert ((y.double() - exact).abs() <= x.double().abs() @ w.abs().t() * 2.0**-8).all()


def test_bad_arguments_are_refused_by_name():
    codes, scale, zero = affine4(8, 192, 32)
    packed, sz = native_int4.pack_rows(codes, scale, zero)
    x = torch.randn(1, 192).to(BF16)
    with pytest.raises(ValueError, match="group 32 or a multiple of 64"):
        native_int4.gemv(packed, sz[:, :2], 96, x)             # runs of a group would straddle
    with pytest.raises(ValueError, match=r"x bf16 \[1, 192\]"):
        native_int4.gemv(packed, sz, 32, x.float())
    with pytest.raises(ValueError, match=r"x bf16 \[1, 192\]"):
        native_int4.gemv(packed, sz, 32, torch.randn(2, 192).to(BF16))
    with pytest.raises(ValueError, match="multiple of 8"):
        native_int4.pack_rows(codes[:, :12], scale, zero)


@pytest.mark.parametrize("group", [32, 128])
def test_torchao_int4_takes_it_for_one_row_from_its_stored_pieces(group, monkeypatch):
    """One row where the vector loop is built: the C product, its layout made per call from
    torchao's stored pieces (the same bits as ``pack_rows``' kept form); other rows, and every
    row elsewhere, decode. Nothing is kept beside the stored pieces."""
    seen = []
    gemv = native_int4.gemv
    monkeypatch.setattr(native_int4, "gemv", lambda *a, **k: seen.append(a) or gemv(*a, **k))
    n, k = 48, 256
    packed, scale, zero = iq.int4_quantize_groupwise(torch.randn(n, k).to(BF16), group)
    w = f4.prepare_int4_weight(packed, scale, zero, lazy=True)
    ref = w.dequantize(BF16).double()
    for rows in (1, 3, 1):
        x = torch.randn(rows, k).to(BF16)
        y = fl.linear_weight_only(x, w)
        exact = x.double() @ ref.t()
        assert ((y.double() - exact).abs() <= x.double().abs() @ ref.abs().t() * 2.0**-7 + 1e-6).all()
        if rows == 1 and native_int4.vector_loop():
            kept = native_int4.pack_rows(iq.int4_unpack(packed), scale, zero)
            assert torch.equal(y, gemv(*kept, group, x))
    assert len(seen) == (2 if native_int4.vector_loop() else 0)
    assert w.packed is None and w.make_packed is None


def test_the_vector_loop_is_built_exactly_where_avx2_is_and_avx512_is_not(native_target):
    """In the AVX2 build (and the native one of an AVX2-only CPU): not in the portable build, nor
    where AVX-512 is, where torch's int4pack is the faster one-row product."""
    if native_target == "native":
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
        expected = "avx2" in flags and "fma" in flags and "avx512f" not in flags
    else:
        expected = native_target == "x86-64-v3"
    assert native_int4.vector_loop() == expected
