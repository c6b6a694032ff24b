"""GGUF block math (diffquant.ops.formats.gguf) against gguf-py's numpy reference, bit for bit.

Random bytes exercise every bit of every field; one hand-built block per family pins the layout
to values worked out by hand from ggml's format.
"""

import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as np_dequantize
from gguf.quants import quantize as np_quantize

from diffquant.errors import QuantizationError
from diffquant.ops.formats.gguf import (BLOCK_LAYOUT, QUANTIZABLE_TYPES, GGMLType, byte_shape,
                                        dequantize, logical_shape, quantize)

ALL_TYPES = list(GGMLType)
QUANT_ONLY = [t for t in ALL_TYPES if BLOCK_LAYOUT[t][0] > 1]


def _random_blocks(qtype, rows=3, blocks_per_row=2, seed=0):
    """Random bytes with every half-float scale replaced by a finite random value."""
    rng = np.random.default_rng(seed + int(qtype))
    _, size = BLOCK_LAYOUT[qtype]
    raw = rng.integers(0, 256, size=(rows, blocks_per_row * size), dtype=np.uint8)
    # clear the exponent's top bit of every byte pair that could be a half: no inf/nan scales
    # (data bytes change too, which is fine: they stay random).
    raw[:, 1::2] &= 0xBF
    return raw


@pytest.mark.parametrize("qtype", QUANT_ONLY, ids=lambda t: t.name)
def test_dequantize_matches_gguf_numpy(qtype):
    raw = _random_blocks(qtype)
    expected = np_dequantize(raw, gguf.GGMLQuantizationType(int(qtype)))
    got = dequantize(torch.from_numpy(raw), qtype)
    assert got.dtype == torch.float32 and tuple(got.shape) == expected.shape
    np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.parametrize("qtype", [GGMLType.F32, GGMLType.F16, GGMLType.BF16], ids=lambda t: t.name)
def test_float_types_match_gguf_numpy(qtype):
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    stored = np_quantize(x, gguf.GGMLQuantizationType(int(qtype)))
    raw = np.ascontiguousarray(stored).view(np.uint8).reshape(3, -1)
    expected = np_dequantize(stored, gguf.GGMLQuantizationType(int(qtype))).astype(np.float32)
    np.testing.assert_array_equal(quantize(torch.from_numpy(x), qtype).numpy(), raw)
    np.testing.assert_array_equal(dequantize(torch.from_numpy(raw), qtype).numpy(), expected)


@pytest.mark.parametrize("qtype", [t for t in QUANTIZABLE_TYPES if 1 < BLOCK_LAYOUT[t][0] < 256],
                         ids=lambda t: t.name)  # gguf-py has no K-quant quantizer: test_gguf_kquant.py
def test_quantize_matches_gguf_numpy(qtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 128)).astype(np.float32) * 3
    x[0, :32] = 0          # an all-zero block (scale 0)
    x[1, :32] = 1.5        # a constant block (Q4_1/Q5_1: max == min)
    x[2, 5] = -x[2, :32].__abs__().max() - 1  # the largest magnitude is negative
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np_quantize(x, gguf.GGMLQuantizationType(int(qtype)))
    got = quantize(torch.from_numpy(x), qtype)
    assert got.dtype == torch.uint8 and tuple(got.shape) == expected.shape
    np.testing.assert_array_equal(got.numpy(), expected)


def test_quantize_bf16_input_matches_float32_input():
    x = torch.randn(4, 64).to(torch.bfloat16)
    assert torch.equal(quantize(x, "Q8_0"), quantize(x.float(), "Q8_0"))


def test_dequantize_dtype_is_cast_last():
    raw = torch.from_numpy(_random_blocks(GGMLType.Q4_K))
    assert torch.equal(dequantize(raw, "Q4_K", torch.bfloat16),
                       dequantize(raw, "Q4_K").to(torch.bfloat16))


def _f16(value):
    return list(np.array([value], dtype=np.float16).view(np.uint8))


# -- one hand-built block per family ---------------------------------------------------------
def test_hand_built_q8_0():
    block = _f16(0.5) + list(np.arange(-16, 16, dtype=np.int8).view(np.uint8))
    got = dequantize(torch.tensor([block], dtype=torch.uint8), "Q8_0")
    assert got.tolist() == [[0.5 * v for v in range(-16, 16)]]


def test_hand_built_q4_0_and_q4_1():
    # element i in the low nibble of byte i, element i + 16 in the high nibble
    nibbles = [(i & 0x0F) | ((15 - i) << 4) for i in range(16)]
    q = list(range(16)) + [15 - i for i in range(16)]
    got = dequantize(torch.tensor([_f16(2.0) + nibbles], dtype=torch.uint8), "Q4_0")
    assert got.tolist() == [[2.0 * (v - 8) for v in q]]
    got = dequantize(torch.tensor([_f16(0.25) + _f16(-1.0) + nibbles], dtype=torch.uint8), "Q4_1")
    assert got.tolist() == [[0.25 * v - 1.0 for v in q]]


def test_hand_built_q5_0_and_q5_1():
    q = [(7 * i) % 32 for i in range(32)]
    nibbles = [(q[i] & 0x0F) | ((q[i + 16] & 0x0F) << 4) for i in range(16)]
    mask = sum(((v >> 4) & 1) << i for i, v in enumerate(q))
    high = list(int(mask).to_bytes(4, "little"))
    got = dequantize(torch.tensor([_f16(0.5) + high + nibbles], dtype=torch.uint8), "Q5_0")
    assert got.tolist() == [[0.5 * (v - 16) for v in q]]
    got = dequantize(torch.tensor([_f16(1.0) + _f16(3.0) + high + nibbles], dtype=torch.uint8), "Q5_1")
    assert got.tolist() == [[v + 3.0 for v in q]]


def test_hand_built_q2_k():
    # 16 sub-blocks of 16: scale nibble s=2, min nibble m=1; all 2-bit values 3
    block = [0x12] * 16 + [0xFF] * 64 + _f16(0.5) + _f16(0.25)
    got = dequantize(torch.tensor([block], dtype=torch.uint8), "Q2_K")
    assert got.tolist() == [[0.5 * 2 * 3 - 0.25 * 1] * 256]


def test_hand_built_q4_k_and_q5_k():
    # scales bytes 0-3 = sub-block scales 0-3 (6 bits), 4-7 = mins 0-3, 8-11 = low nibbles of
    # scales 4-7 and (high nibble) of mins 4-7. Use scale 3, min 1 everywhere.
    scales = [3] * 4 + [1] * 4 + [0x13] * 4
    q4 = [0x21] * 128   # low nibble 1 (first 32 of each 64), high nibble 2 (next 32)
    got = dequantize(torch.tensor([_f16(1.0) + _f16(2.0) + scales + q4], dtype=torch.uint8), "Q4_K")
    expect = ([3 * 1 - 2 * 1] * 32 + [3 * 2 - 2 * 1] * 32) * 4
    assert got.tolist() == [expect]
    qh = [0x01] * 32    # bit 0 set -> sub-block 0 gets +16, others +0
    got = dequantize(torch.tensor([_f16(1.0) + _f16(2.0) + scales + qh + q4], dtype=torch.uint8), "Q5_K")
    expect[:32] = [3 * 17 - 2] * 32
    assert got.tolist() == [expect]


def test_hand_built_q3_k_and_q6_k():
    # Q3_K: every 6-bit scale 33 (-> 1 after the -32 offset): low nibbles 1, high bits 2
    scales = [0x11] * 8 + [0xAA] * 4
    hmask = [0xFF] * 32  # high bit set everywhere -> no "-4"
    qs = [0b11100100] * 64  # 2-bit values 0, 1, 2, 3 for the four shifts
    got = dequantize(torch.tensor([hmask + qs + scales + _f16(0.5)], dtype=torch.uint8), "Q3_K")
    expect = [0.5 * v for v in ([0] * 32 + [1] * 32 + [2] * 32 + [3] * 32) * 2]
    assert got.tolist() == [expect]
    # Q6_K: low nibbles 5, high 2 bits 1 -> q = 5 + 16 - 32 = -11; int8 scales -2
    block = [0x55] * 128 + [0x55] * 64 + list(np.full(16, -2, np.int8).view(np.uint8)) + _f16(0.5)
    got = dequantize(torch.tensor([block], dtype=torch.uint8), "Q6_K")
    assert got.tolist() == [[0.5 * -2 * -11] * 256]


def test_shapes_and_errors():
    assert byte_shape((4, 64), "Q4_0") == (4, 36)
    assert logical_shape((4, 210), "Q6_K") == (4, 256)
    with pytest.raises(QuantizationError, match=r"row length 48 is not a multiple of the block size 32"):
        quantize(torch.zeros(2, 48), "Q8_0")
    with pytest.raises(QuantizationError, match=r"can load this type but not quantize to it"):
        quantize(torch.zeros(2, 256), "Q2_K")
    with pytest.raises(QuantizationError, match=r"GGUF type 'Q9_9' is not supported"):
        dequantize(torch.zeros(2, 34, dtype=torch.uint8), "Q9_9")
    with pytest.raises(QuantizationError, match=r"35 bytes per row is not a multiple of the block size 34"):
        dequantize(torch.zeros(2, 35, dtype=torch.uint8), "Q8_0")
