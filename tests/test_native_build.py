"""ops/native/build.py's build: cached, chosen by DIFFQUANT_MARCH among the targets, refused by name
where this CPU cannot execute it, compiled for every target by this machine's compiler, off
with DIFFQUANT_NATIVE=0 or without a compiler (the torch ops then give the same numbers), on
torch's OpenMP pool or threads of its own."""

import logging

import pytest
import torch

from diffquant.ops.cpu import gguf as fg
from diffquant.ops.formats import gguf as gd
from diffquant.ops.native import build as native
from diffquant.ops.native import gguf as native_gguf
from diffquant.ops.native import registry
from tests.native_targets import TARGETS
from tests.test_fast_linear import gguf_blocks
from tests.test_native import assert_same

CC = native.shutil.which("cc") or "gcc"
X86 = native.platform.machine().lower() in ("x86_64", "amd64")


def test_the_kernels_build_here_and_are_cached(tmp_path, monkeypatch):
    assert native.available()  # CI's machine has a C compiler: the fast path is what runs
    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path))
    first = native._build(CC)
    mtime = first.stat().st_mtime_ns
    assert first.parent == tmp_path / "native"
    assert native._build(CC) == first
    assert first.stat().st_mtime_ns == mtime  # found in the cache, not rebuilt


@pytest.mark.skipif(not X86, reason="the targets are x86-64's")
@pytest.mark.parametrize("target", [t for t in native.TARGETS if t != "native"])
def test_every_target_compiles_here_even_where_this_cpu_cannot_run_it(target):
    """An AVX-512 or AMX path that does not compile fails here on any x86-64 machine, not only
    on the CPUs that would run it (built, not loaded; the cache then serves the per-target
    runs)."""
    assert native._build(CC, native.target_flags(target) + native.OPENMP).stat().st_size > 0


@pytest.mark.skipif(not X86, reason="the targets are x86-64's")
def test_the_targets_this_cpu_lacks_are_named_with_what_it_lacks():
    flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
    assert native.missing_features("native") == [] and native.missing_features("x86-64") == []
    v4 = native.missing_features("x86-64-v4")
    assert v4 == sorted({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} - set(flags))
    assert set(v4) <= set(native.missing_features("sapphirerapids"))
    assert ("amx_tile" in native.missing_features("sapphirerapids")) == ("amx_tile" not in flags)


def test_march_chooses_the_build_and_refuses_what_it_does_not_know(monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("DIFFQUANT_MARCH", "x86-64")
    assert native.march() == "x86-64" and native.target_flags("x86-64")[1] == "-march=x86-64"
    if X86:
        assert native.available() and not native.library().dq_int4_gemv_vector()  # portable
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("DIFFQUANT_MARCH", "znver9")
    with pytest.raises(ValueError, match=r"DIFFQUANT_MARCH='znver9' is not a build target; "
                                         r"expected one of native, x86-64, x86-64-v3"):
        native.available()


@pytest.mark.skipif(not X86, reason="the targets are x86-64's")
def test_march_refuses_a_build_this_cpu_cannot_execute(monkeypatch):
    foreign = next((t for t in native.TARGETS if native.missing_features(t)), None)
    if foreign is None:
        pytest.skip("this CPU executes every target (an AMX Xeon)")
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("DIFFQUANT_MARCH", foreign)
    with pytest.raises(RuntimeError, match=rf"DIFFQUANT_MARCH={foreign}: this CPU cannot execute "
                                           rf"the {foreign} build of the kernels \(it lacks avx512"):
        native.available()


def test_the_per_target_runs_cover_every_target():
    assert TARGETS[:len(native.TARGETS)] == list(native.TARGETS)


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("DIFFQUANT_NATIVE", "0")
    assert not native.available()


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger="diffquant.ops.native.build"):
        assert not native.available() and not native.available()
    assert [r.message for r in caplog.records if "could not build" in r.message] != []
    assert len(caplog.records) == 1
    blocks = gguf_blocks(8, 64, "Q4_0")
    out = fg.dequantize_into(blocks, "Q4_0", torch.empty(8, 64, dtype=torch.bfloat16))
    assert torch.equal(out, gd.dequantize(blocks, "Q4_0", torch.bfloat16))
    assert list(tmp_path.rglob("*.so")) == []  # no half-built library left behind


# -- threads: torch's OpenMP pool, or threads of our own ---------------------------------------
def test_the_kernels_run_on_torchs_openmp_pool():
    assert native._torch_uses_libgomp()  # torch's Linux CPU wheels: GNU OpenMP
    assert native.threading_kind() == "torch's OpenMP pool"
    maps = open("/proc/self/maps").read().splitlines()
    # the kernels need libgomp.so.1: the one mapped is torch's, not a second (system) copy
    # (wheels that bundle a renamed copy, as sentencepiece's, keep theirs to themselves)
    gomp = {line.split()[-1] for line in maps if line.endswith("/libgomp.so.1")}
    assert len(gomp) == 1 and "torch" in gomp.pop()


def test_a_build_with_posix_threads_gives_the_same_bits():
    own = registry.bind(native.ctypes.CDLL(str(native._build(CC, native.FLAGS))))
    blocks = gguf_blocks(201, 96, "Q4_1")  # 201 rows: ranges of unequal length
    out = native_gguf.decode_into(blocks, gd.GGMLType.Q4_1, torch.empty(201, 96))
    assert_same(native_gguf.decode_into(blocks, gd.GGMLType.Q4_1, torch.empty(201, 96), own), out)
    x = torch.randn(200, 64).to(torch.bfloat16)  # 200 rows: two threads
    x[199, 5] = float("nan")  # the last range asks for the fallback: so does the whole call
    for lib in (own, native.library()):
        assert not registry.run("quantize", 200, x=x, ldx=64, k=64,
                                q=torch.empty(200, 64, dtype=torch.int8),
                                scale=torch.empty(200), lib=lib)
