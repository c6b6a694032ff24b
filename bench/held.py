"""Forward time and memory held after forwards, per CLI scheme, at Flux.1-dev's width.

    python -m bench.held                  # 1 double + 1 single block at width 3072 (0.48B
                                          # parameters), 256 and 1024 image + 64 text tokens
    python -m bench.held gguf:q4_0 torchao:int8wo

One process, 2 threads; each scheme quantizes the same random bf16 checkpoint on load
(bench/model.py's writer), warms up once at each token count, then times the best of two
forwards. "held" is every byte reachable from the model after those forwards (parameters,
buffers, and whatever a layer keeps beside them: prepared forms, caches, closures), each storage
once, over ``get_memory_footprint()``; "vs int8wo" the forward's time over int8 weight-only's in
the same run.
"""

from __future__ import annotations

import sys
import time

import torch

from bench.model import Size, ensure_checkpoint, make_inputs
from diffquant.reachable import reachable_tensors, storage_bytes

SIZE = Size("held", heads=24, double=1, single=1, image_tokens=(256, 1024), text_tokens=64,
            repeats=2)
SCHEMES = ("bf16", "torchao:int8wo", "torchao:int8dq", "gguf:q4_0", "gguf:q4_1", "gguf:q4_k",
           "gguf:q8_0", "gguf:q6_k", "torchao:int4wo", "quanto:int4", "bitsandbytes:nf4")


def held_bytes(root) -> int:
    """Bytes of every tensor storage reachable from ``root`` (modules, attributes, containers,
    closures and defaults of functions, tensor subclasses' inner tensors), each storage once."""
    return storage_bytes(reachable_tensors(root, into_modules=True))


def _load(path, spec: str):
    from diffquant import FluxTransformer2DModel
    from diffquant.spec import diffquant_config, parse_spec

    config = None
    if spec != "bf16":
        config = diffquant_config(parse_spec(spec))
        for field in ("compute_dtype", "bnb_4bit_compute_dtype"):
            if hasattr(config, field):
                setattr(config, field, torch.bfloat16)
    return FluxTransformer2DModel.from_pretrained(path, quantization_config=config,
                                                  torch_dtype=torch.bfloat16)


def measure(path, spec: str) -> dict:
    model = _load(path, spec)
    out = {"footprint": model.get_memory_footprint()}
    with torch.no_grad():
        for n in SIZE.image_tokens:
            inputs = make_inputs(SIZE, n)
            for key in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
                inputs[key] = inputs[key].to(torch.bfloat16)
            model(**inputs, return_dict=False)
            best = float("inf")
            for _ in range(SIZE.repeats):
                start = time.perf_counter()
                model(**inputs, return_dict=False)
                best = min(best, time.perf_counter() - start)
            out[n] = best
    out["held"] = held_bytes(model)
    return out


def main(argv=None) -> None:
    torch.set_num_threads(2)
    schemes = (argv if argv is not None else sys.argv[1:]) or SCHEMES
    path = ensure_checkpoint(SIZE)
    rows, base = [], {}
    for spec in schemes:
        r = measure(path, spec)
        base = r if spec == "torchao:int8wo" else base
        rows.append((spec, r))
        print(spec, r, flush=True)
    head = ["scheme", "footprint MB", "held after forwards / footprint"]
    for n in SIZE.image_tokens:
        head += [f"{n} img s", f"{n} vs int8wo"]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for spec, r in rows:
        cells = [f"`{spec}`", f"{r['footprint'] / 1e6:.0f}", f"{r['held'] / r['footprint']:.3f}"]
        for n in SIZE.image_tokens:
            cells += [f"{r[n]:.2f}", f"{r[n] / base[n]:.2f}x" if base else "-"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
