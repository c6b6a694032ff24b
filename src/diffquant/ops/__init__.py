"""Quantized math, in three layers (each imports only from the ones below it; ops/ imports
nothing of diffquant but its errors, tests/test_ops_layout.py checks it):

- ``formats/``: each format's reference math, pure torch: what a checkpoint's bytes mean, how to
  quantize to them and decode them. The oracle the tests compare every faster path against.
- ``cpu/``: the same numbers in less time on a CPU: prepared weights, the few-row and many-row
  products, quantize-on-load; ``cpu/dispatch.py`` is the one table of which kernel runs for a
  format, a row count and a CPU (``python -m diffquant.ops`` prints it).
- ``native/``: build, load and call the C kernels of ``native/csrc/``, by name.
"""
