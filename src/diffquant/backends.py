"""The quantization backends: each is one file of ``quantizers/`` (its config, layer and
quantizer, which registers itself with ``quantizers.auto.register_quantizer``, and the CLI
schemes its config class lists in ``cli_schemes``) and its line here, the one registration.
``quantizers/__init__`` imports each module; ``diffquant`` exports each config class by name.
A leaf module (no imports), so ``import diffquant`` reads it without importing a backend."""

BACKENDS = {  # module of quantizers/ -> its config class
    "torchao": "TorchAoConfig",
    "bitsandbytes": "BitsAndBytesConfig",
    "quanto": "QuantoConfig",
    "gguf": "GGUFQuantizationConfig",
    "modelopt": "NVIDIAModelOptConfig",
}
