"""Each format's reference math, pure torch (the oracle of the tests): ``gguf`` (GGML block
types, their table, dequantize and quantize; ``gguf_kquant`` the K-quant quantizers),
``torchao`` (int8, int4 and float8 as torchao computes them), ``quanto`` (optimum-quanto's
quantization and packing), ``modelopt`` (ModelOpt's compressed formats)."""
