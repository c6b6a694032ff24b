"""ops/cpu/quantize.py's bitsandbytes and GGUF passes (csrc/quantize_blocks.c) against the
reference quantizers, per scheme and per build of the C kernels: bitsandbytes' own
quantize_4bit (NF4/FP4, double quantization, another storage dtype) and int8_vectorwise_quant,
and ops/formats/gguf.quantize (gguf-py's numpy, bit for bit: tests/test_gguf*.py; for the
K-quants ops/formats/gguf_kquant.py, ggml's order, and csrc/quantize_kquant.c). Zero
blocks, signed zeros, bf16 subnormals, values past fp16's range, ties of magnitude, inf and NaN
give the reference's bytes; where the reference's codes are the platform's cast of a NaN or an
infinity, the C pass hands the weight to the reference (and says so by running no kernel)."""

import pytest
import torch

from diffquant.ops.cpu import quantize as cq
from diffquant.ops.formats import gguf as gg
from diffquant.ops.native import quantize as native_quantize
from diffquant.ops.native import registry

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("native_target")  # every build this machine can execute


def edge_weight(n=40, k=256, nonfinite=False, seed=0) -> torch.Tensor:
    """bf16 [n, k]: random rows plus rows of the edge values (40 rows: split over threads)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0] = 0.0                                              # zero blocks
    w[1, :64] = -0.0                                        # a block of -0
    w[2, :10] = torch.tensor([1e-39, -1e-40, 5e-41, 3e38, -3e38, 1e-30, 65504., 7e4, -65520.,
                              2 ** -25])                    # subnormals, past fp16's range
    w[3, :64] *= 1e-37                                      # a block below bnb's 1e-38 clamp
    w[4, 7] = w[4, :32].abs().max() * 2                     # a tie of magnitudes: the first
    w[4, 9] = -w[4, 7]
    w[5, :32] = 1e-40                                       # a block of one subnormal
    w[6, 32:64] = 0.5                                       # a constant block
    w[6, 64:96] = w[6, 64:96].abs()                         # minima of zero: +0, -0, both
    w[6, 70], w[6, 96:128], w[6, 100], w[6, 130] = 0.0, w[6, 96:128].abs(), -0.0, 0.0
    if nonfinite:
        w[7, 5], w[8, 40], w[9, 0] = float("inf"), float("nan"), float("-inf")
    return w.to(torch.bfloat16)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("nonfinite", [False, True])
def test_bnb_4bit_is_bitsandbytes_bit_for_bit(quant_type, double_quant, storage, nonfinite):
    """Packed codes and every piece of the quant state (absmax, its double quantization, the
    code, the JSON fields) as bitsandbytes writes them; a NaN's absmax keeps its bits."""
    w = edge_weight(nonfinite=nonfinite)
    with registry.trace() as ran:
        packed, state = cq.bnb_quantize_4bit(w, quant_type, double_quant, storage)
    assert ran == ["bnb4_quantize"]
    ref, ref_state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                                  compress_statistics=double_quant,
                                                  quant_storage=storage)
    assert same_bytes(packed, ref)
    ours, theirs = state.as_dict(packed=True), ref_state.as_dict(packed=True)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert same_bytes(ours[key], value) if isinstance(value, torch.Tensor) \
            else ours[key] == value, key


def test_bnb_4bit_leaves_a_partial_last_block_to_bitsandbytes():
    w = edge_weight()[:3, :96].contiguous()                 # 288 values: 4.5 blocks of 64
    with registry.trace() as ran:
        packed, state = cq.bnb_quantize_4bit(w, "nf4", False, torch.uint8)
    ref, ref_state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert ran == [] and same_bytes(packed, ref) and same_bytes(state.absmax, ref_state.absmax)


@pytest.mark.parametrize("nonfinite", [False, True])
def test_bnb_int8_is_bitsandbytes_bit_for_bit(nonfinite):
    """The fp16 weight's rows. A weight with a zero row, a value past fp16's range (an inf
    absmax) or an inf or NaN goes to bitsandbytes whole (its codes are the cast of NaN / inf);
    rows 10.. of the edge weight hold none: the C pass's codes."""
    w = edge_weight(nonfinite=nonfinite)
    for weight in (w, w[10:]):
        with registry.trace() as ran:
            cb, scb = cq.bnb_int8_vectorwise(weight)
        assert ran == ["bnb_int8_quantize"]
        ref_cb, ref_scb, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
        assert same_bytes(cb, ref_cb) and same_bytes(scb, ref_scb)


def test_bnb_int8_rounds_to_fp16_as_torch_over_every_bf16_value():
    """Every finite bf16 value in fp16's range, through the C pass's fp16 rounding (one row per
    exponent, scaled so the row's absmax is its own): bitsandbytes' codes and absmax."""
    bits = torch.arange(0, 0x4780, dtype=torch.int32)        # +0 .. 65280, and their negatives
    values = torch.cat([bits, bits | 0x8000]).to(torch.int16).view(torch.bfloat16)
    w = values[: values.numel() // 128 * 128].reshape(-1, 128)
    w = w[w.float().abs().amax(1) > 0]                       # zero rows go to bitsandbytes
    cb, scb = cq.bnb_int8_vectorwise(w.contiguous())
    ref_cb, ref_scb, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16))
    assert same_bytes(cb, ref_cb) and same_bytes(scb, ref_scb)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1"])
@pytest.mark.parametrize("nonfinite", [False, True])
def test_gguf_blocks_are_the_reference_bit_for_bit(qtype, nonfinite):
    """ops/formats/gguf.quantize's bytes (gguf-py's); inf or NaN: the reference's whole."""
    w = edge_weight(nonfinite=nonfinite)
    with registry.trace() as ran:
        blocks = cq.gguf_quantize(w, qtype)
    assert ran == ["gguf_quantize"]
    assert same_bytes(blocks, gg.quantize(w, qtype))
    # and gguf-py's own on rows where its codes are defined (rows 2-3: 1 / d overflows and
    # numpy casts inf; ops/formats and the C pass agree there, through the fallback)
    gguf = pytest.importorskip("gguf")
    ref = gguf.quants.quantize(w[10:].float().numpy(), gguf.GGMLQuantizationType[qtype])
    assert same_bytes(blocks[10:], torch.from_numpy(ref))


def test_gguf_types_without_a_c_pass_are_the_reference():
    w = edge_weight()
    with registry.trace() as ran:
        assert same_bytes(cq.gguf_quantize(w, "F16"), gg.quantize(w, "F16"))
    assert ran == []


@pytest.mark.parametrize("qtype", ["Q4_1", "Q5_1"])
def test_a_minimum_of_zeros_of_both_signs_is_left_to_the_reference(qtype):
    """torch's amin picks the stored zero's sign by its lane order there: the C pass does not
    guess, the reference writes the weight."""
    w = edge_weight()[10:].abs().contiguous()
    w[0, 3], w[0, 9] = -0.0, 0.0
    assert same_bytes(cq.gguf_quantize(w, qtype), gg.quantize(w, qtype))
    assert native_quantize.gguf(w, int(gg.ggml_type(qtype))) is None


# -- the K-quants (csrc/quantize_kquant.c, quantize_q6k.c) -----------------------------------------
def kquant_weight(nonfinite=False) -> torch.Tensor:
    """float32 [41, 768]: 123 super-blocks (odd: a thread's last pair is a single one), Gaussian
    rows plus the super-blocks ggml treats specially."""
    w = edge_weight(41, 768, nonfinite=nonfinite, seed=1).float()  # rows 2-3: bf16 extremes
    w[10, :256] = 1.5                                       # constant: min clamps to 0
    w[11, :256] = -w[11, :256].abs()                        # all negative
    w[12, 256:512] = w[12, 256:512].abs()                   # all positive
    w[13, :256] *= 1e-30                                    # tiny scales: fp16 d subnormal / 0
    w[14, :256] *= 3e36                                     # d past fp16's range: inf
    w[15, 32:64] = 0.0                                      # a zero sub-block: scale 0, ggml's
    w[15, 100:116] *= 1e-6                                  # codes of its search kept
    w[16, :256] = torch.arange(256.0).remainder(7) - 3      # integer ties of nearest_int
    w[17, 7] = -w[17, :256].abs().max() * 2                 # largest magnitude negative
    return w


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("nonfinite", [False, True])
def test_gguf_kquants_are_the_reference_bit_for_bit(qtype, dtype, nonfinite):
    """ops/formats/gguf_kquant.py's bytes (ggml's quantize_row_q*_K_ref, its order) from bf16,
    float32 and float16 weights (float16's: values past its range are infinities); inf or NaN:
    the reference's whole weight."""
    w = kquant_weight(nonfinite).to(dtype)
    if dtype == torch.float16 and not nonfinite:
        w = w.clamp(-6e4, 6e4)                              # finite: the C kernel's
    with registry.trace() as ran:
        blocks = cq.gguf_quantize(w, qtype)
    assert ran == ["gguf_kquant"]
    assert same_bytes(blocks, gg.quantize(w, qtype))
    assert (native_quantize.gguf_kquant(w, int(gg.ggml_type(qtype))) is None) == nonfinite


def test_gguf_kquant_exact_search_is_the_reference(native_target):
    """Where a grid of make_qkx2_quants leaves nearest_int's exact range the C kernel runs
    ggml's scalar search for those super-blocks: built to take it everywhere, the same bytes."""
    from diffquant.ops.native import build

    if native_target != "native":
        pytest.skip("one build is enough: the scalar search has no vector paths")
    lib = build.build_for("native", extra=("-DDQ_KQUANT_EXACT",))
    w = kquant_weight().to(torch.bfloat16)
    for qtype in ("Q4_K", "Q5_K"):
        out = torch.empty(w.numel() // 256, 144 if qtype == "Q4_K" else 176, dtype=torch.uint8)
        assert registry.run("gguf_kquant", out.shape[0], lib=lib, qtype=int(gg.ggml_type(qtype)),
                            w=w, dtype=0, out=out, min_rows=8)
        assert same_bytes(out.reshape(41, -1), gg.quantize(w, qtype))
