"""diffquant.cpu_paths (``python -m diffquant.ops --probe``): the kernels it reports are the ones
the layers run, for each build of the kernels this machine executes."""

import pytest

from diffquant import cpu_paths
from diffquant.ops.cpu import dispatch
from diffquant.ops.native import int4 as native_int4
from diffquant.ops.native import int8_amx as native_amx

pytestmark = pytest.mark.usefixtures("native_target")


def test_the_probe_names_each_paths_kernels():
    found = {s: cpu_paths.probe(s) for s in ("torchao:int8wo", "torchao:int4wo", "gguf:q8_0",
                                             "torchao:int8dq")}
    assert found["torchao:int8wo"][1] == "C int8_gemv"
    assert found["torchao:int8wo"][4] == "C scale_rows + _weight_int8pack_mm(bfloat16)"
    assert found["torchao:int4wo"][1] == ("C int4_gemv" if native_int4.vector_loop()
                                          else "C int4_tinygemm + mm(bfloat16)")
    assert found["torchao:int4wo"][256] == "C int4_tinygemm + mm(bfloat16)"  # tests: bf16 mm
    assert found["gguf:q8_0"] == {1: "C gemv", 4: "C decode + addmm(bfloat16)",
                                  256: "C decode + addmm(bfloat16)"}
    many = found["torchao:int8dq"][256]
    if native_amx.amx_available():
        assert many == "C quantize_vnni + C amx_linear"
    elif dispatch._int_mm_slow():
        assert many == "C quantize + C int8_dot + C int8_output"
    else:
        assert many == "C quantize + C int8_output + _int_mm(int8)"


def test_the_table_has_a_row_per_scheme_and_a_cell_per_row_count():
    lines = cpu_paths.table(["quanto:int8", "gguf:q6_k"], rows=(1, 300)).splitlines()
    assert "C kernels:" in lines[0]
    assert lines[2] == "| scheme | 1 row | 300 rows |"
    assert lines[4].startswith("| `quanto:int8` | C int8_gemv | C int8_rows + mm(bfloat16)")
    assert lines[5].startswith("| `gguf:q6_k` | C gemv | C decode + addmm(bfloat16)")
