"""``diffquant compare``: each variant (unquantized, then each SPEC) generated in its own child
``python -m diffquant generate`` (or Ray task), so each peak memory is its own; one labelled grid,
each image beside it, and a table of sizes, times and PSNR against the unquantized image.

Example:
    $ diffquant compare --prompt "a red circle" --quantize torchao:int8wo --quantize gguf:Q4_0
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from .media import load_frames, save_output


class ChildError(Exception):
    """A compare variant failed in its child process; carries the child's exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _child_command(args, model: str, specs: list[str], image: Path, stats: Path) -> list[str]:
    from .commands import RUN_SIZES  # lazy: commands.py re-exports this module's names

    cmd = [sys.executable, "-m", "diffquant", "generate", "--model", model, "--prompt", args.prompt,
           "--steps", str(args.steps), "--seed", str(args.seed), "--dtype", args.dtype,
           "--device", args.device, "--out", str(image), "--stats-json", str(stats),
           "--fps", str(args.fps)]
    for key in (*RUN_SIZES, "image"):
        if getattr(args, key):
            flag = "--frames" if key == "num_frames" else f"--{key.replace('_', '-')}"
            cmd += [flag, str(getattr(args, key))]
    cmd += [x for spec in args.lora or () for x in ("--lora", spec)]
    return cmd + [x for s in specs for x in ("--quantize", s)] + \
        (["--quiet"] if args.quiet else []) + (["--debug"] if args.debug else [])


def cmd_compare(args) -> int:
    """Each variant runs in a fresh child process, so its peak memory is its own."""
    import subprocess
    import tempfile

    import numpy as np

    from ..report import compare_table, image_grid
    from .commands import EXIT_OK, EXIT_RUNTIME, _model_index, _quant_config, check_image_file

    check_image_file(args)
    from .lora import check_loras

    check_loras(args.lora)  # every variant, the unquantized one too, runs with the LoRAs
    model, index = _model_index(args.model)
    variants = [[]] + [v.split("+") for v in args.quantize]
    for specs in variants[1:]:
        _quant_config(specs, model, index)  # a bad SPEC fails here, before anything runs
    labels = ["unquantized"] + args.quantize
    results, videos = [], []
    with tempfile.TemporaryDirectory(prefix="diffquant-compare-") as tmp:
        files = [(str(Path(tmp) / f"{i}.png"), str(Path(tmp) / f"{i}.json"))
                 for i in range(len(variants))]
        children = [_child_command(args, model, specs, *f) for specs, f in zip(variants, files)]
        codes = None
        if getattr(args, "ray", None) is not None:  # every variant at once, as Ray tasks
            from .batch import run_children_on_ray

            codes = run_children_on_ray(children, files, args)
        for i, (specs, label) in enumerate(zip(variants, labels)):
            print(f"[{i + 1}/{len(variants)}] {label}", flush=True)
            image, stats = map(Path, files[i])
            code = codes[i] if codes is not None else subprocess.run(children[i]).returncode
            data = json.loads(stats.read_text()) if stats.is_file() else {}
            if code != 0 or "error" in data:
                died = (f"its process died with signal {-code} (out of memory?); run it "
                        "alone with 'diffquant generate'") if code < 0 else \
                    f"its process exited with {code}; rerun with --debug"
                raise ChildError(f"variant {label!r}: {data.get('error', died)}",
                                 data.get("code", EXIT_RUNTIME))
            videos.append(load_frames(image))  # one frame for an image
            results.append(data)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid([v[0] for v in videos], labels).save(out)  # a video shows its first frame
    for i, (frames, label) in enumerate(zip(videos, labels)):  # each full-size, beside the grid
        name = out.with_name(f"{out.stem}-{i}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', label)}.png")
        save_output(frames if len(frames) > 1 else frames[0], name, args.fps)
    # PSNR over every frame of a video
    print(compare_table(labels, results, [np.stack([np.asarray(f) for f in v]) for v in videos]))
    print(f"wrote {out} (and each image as {out.stem}-N-VARIANT.png beside it)")
    return EXIT_OK
