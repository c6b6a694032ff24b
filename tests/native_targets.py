"""Every build of the C kernels that this machine can execute, as the ``native_target`` fixture:
a test that uses it runs once per build (its id names the target), with that build as the
library every layer and wrapper calls. Builds this CPU cannot execute are skipped with the
instruction sets it lacks; where it lacks AVX-512, an AVX-512 build (Zen 4's set: x86-64-v4,
AVX512_BF16, VNNI) also runs emulated (SIMDe's portable intrinsics, ``tests/simde/immintrin.h``),
so the paths of an AVX-512 CPU are checked on an AVX2 one too."""

import hashlib
from pathlib import Path

import pytest

from diffquant.ops.native import build as native

EMULATED = "x86-64-v4-simde"
TARGETS = [*native.TARGETS, EMULATED]
_SHIM = Path(__file__).with_name("simde") / "immintrin.h"
# x86-64-v4 and what AMD Zen 4 adds to it that the kernels could use (its -march=native build)
_AVX512 = ("__AVX512F__", "__AVX512BW__", "__AVX512CD__", "__AVX512DQ__", "__AVX512VL__",
           "__AVX512BF16__", "__AVX512VNNI__")
_builds: dict = {}  # target -> loaded library, or the reason it cannot run here


def _emulated():
    """The x86-64-v4 build (with Zen 4's AVX512_BF16 and VNNI) on top of an AVX2 one, every
    intrinsic SIMDe's portable C or the shim's."""
    import simde_py
    digest = hashlib.sha256(_SHIM.read_bytes()).hexdigest()[:12]  # a changed shim rebuilds
    extra = [f"-D{m}" for m in _AVX512] + ["-O1", "-DSIMDE_NO_NATIVE", f"-DDQ_SHIM={digest}",
                                           f"-I{_SHIM.parent}", f"-I{simde_py.get_include()}"]
    return native.build_for("x86-64-v3", extra=tuple(extra))


def _cannot_run(target: str) -> str | None:
    """Why this machine cannot run ``target``'s build, or None. A build that fails to compile
    is no reason: it fails the tests."""
    if target == EMULATED:
        if not native.missing_features("x86-64-v4"):
            return "this CPU executes the x86-64-v4 build itself"
        try:
            import simde_py  # noqa: F401
        except ImportError:
            return "simde-py (a test dependency) is not installed"
        return None
    missing = native.missing_features(target)
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def build(target: str):
    """The loaded library for ``target``; pytest.skip with the reason where it cannot run."""
    if target not in _builds:
        reason = _cannot_run(target)
        _builds[target] = reason if reason else _emulated() if target == EMULATED \
            else native.build_for(target)
    lib = _builds[target]
    if isinstance(lib, str):
        pytest.skip(f"{target}: {lib}")
    return lib


@pytest.fixture(params=TARGETS)
def native_target(request, monkeypatch):
    """Runs the test with the ``request.param`` build of the kernels; yields the target name."""
    monkeypatch.setitem(native._state, "lib", build(request.param))
    yield request.param


# -- a line per build at the end of the run: which targets the kernel tests ran under ----------
_outcomes: dict = {}  # target -> {"passed": n, "failed": n, "skipped": n}
_skips: dict = {}     # target -> a skip reason


_per_build: set = set()  # the ids of the tests that run per build


def pytest_collection_modifyitems(items):
    _per_build.update(item.nodeid for item in items if "native_target" in item.fixturenames)


def pytest_runtest_logreport(report):
    target = _target_of(report.nodeid) if report.nodeid in _per_build else None
    if target is None or (report.when != "call" and report.outcome == "passed"):
        return
    counts = _outcomes.setdefault(target, {"passed": 0, "failed": 0, "skipped": 0})
    counts[report.outcome] += 1
    if report.skipped and isinstance(report.longrepr, tuple):
        _skips.setdefault(target, report.longrepr[2].removeprefix("Skipped: "))


def _target_of(nodeid: str) -> str | None:
    """The build in a test id ("test_x[x86-64-v3-Q8_0]" -> "x86-64-v3"), or None."""
    params = "-" + nodeid.partition("[")[2].rstrip("]") + "-"
    return next((t for t in sorted(TARGETS, key=len, reverse=True) if f"-{t}-" in params), None)


def pytest_terminal_summary(terminalreporter):
    if not _outcomes:
        return
    terminalreporter.section("native kernel tests per build")
    for target in TARGETS:
        c = _outcomes.get(target)
        if c is None:
            continue
        line = f"{target:16s} {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"
        if not c["passed"] and target in _skips:
            line += f" ({_skips[target]})"
        terminalreporter.write_line(line)
