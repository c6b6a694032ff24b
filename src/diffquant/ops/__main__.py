"""``python -m diffquant.ops``: the kernels every quantization scheme runs on this machine, at
one, a few and many rows (``diffquant.cpu_paths``; an entry point, so it may look up there)."""
from diffquant.cpu_paths import main

main()
