"""The fast CPU paths: the same numbers as ``ops/formats`` in less time. ``dispatch.py`` says
which kernel runs for a format, a row count and a CPU; ``linear.py`` runs a prepared weight
(``int8.py``, ``int4.py``, ``gguf.py`` prepare them); ``int8_dynamic.py`` is int8 dynamic
quantization's forward, ``quantize.py`` quantize-on-load, ``scratch.py`` the reused buffers."""
