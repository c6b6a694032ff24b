"""Build, load and call the C kernels of csrc/: build.py compiles and loads the library,
registry.py calls its kernels by name (their argument lists checked when it loads), and each
other module wraps one C file (gguf.py both GGUF files)."""
