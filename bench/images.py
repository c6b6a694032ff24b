"""Table 6: PSNR of the shipped pipeline's final images per scheme, against the unquantized one.

The shipped pipeline is ``diffquant.assets.default_pipeline_path()``. Each image is generated in
its own child process (``python -m bench.images job.json result.json``): the pipeline is loaded
with only its transformer quantized by the scheme, one prompt, a fixed seed. Where the pipeline
(or FluxPipeline) is not there yet, the table is replaced by a note that says why.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench import tables as bt

PROMPT = "a red circle above a blue square"
STEPS = 4
SEED = 0
# The shipped pipeline was trained at 64x64 with prompts of at most 16 tokens (diffquant.assets).
CALL_KWARGS = dict(height=64, width=64, max_sequence_length=16)


def shipped_pipeline() -> tuple[Path | None, str]:
    """(path, "") of the shipped pipeline, or (None, why it cannot be used)."""
    try:
        from diffquant.assets import default_pipeline_path

        path = Path(default_pipeline_path())
    except Exception as err:  # noqa: BLE001 - any failure means "not shipped yet"
        return None, f"diffquant.assets.default_pipeline_path() is not available ({type(err).__name__}: {err})"
    if not (path / "model_index.json").is_file():
        return None, f"the shipped pipeline is not there yet ({path} has no model_index.json)"
    return path, ""


def run_job(job: dict) -> dict:
    """Child side: load the pipeline (transformer quantized by the job's scheme), one image."""
    import torch

    from bench.schemes import Scheme, config_of
    from bench.worker import short_error

    torch.set_num_threads(job["threads"])
    try:
        from diffquant import DiffusionPipeline
        from diffquant.quantizers import PipelineQuantizationConfig

        scheme = Scheme(**job["scheme"])
        quant = PipelineQuantizationConfig(quant_mapping={"transformer": config_of(scheme)}) \
            if scheme.quantized else None
        pipe = DiffusionPipeline.from_pretrained(job["pipeline"], quantization_config=quant)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        with torch.inference_mode():
            image = pipe(PROMPT, num_inference_steps=job["steps"], output_type="pil", **CALL_KWARGS,
                         generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
        image.save(job["image"])
        return {"image": job["image"]}
    except Exception as err:  # noqa: BLE001 - the error goes into the table cell
        return {"error": short_error(err)}


def images_section(args, schemes, machine: str, log) -> str:
    """The markdown of table 6 (or the note saying why it is skipped)."""
    path, why = shipped_pipeline()
    if path is None:
        return bt.section("images", machine, "", f"Skipped: {why}.")
    import tempfile

    from bench.runner import Runner
    from diffquant.report import psnr

    steps = STEPS
    if args.smoke:  # the code path, not the numbers: the reference and one scheme, one step
        schemes, steps = schemes[:1] + [s for s in schemes if s.quantized][:1], 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="diffquant-bench-img-") as tmp:
        runner = Runner(args.smoke, args.timeout or 1800, Path(tmp), module="bench.images")
        done = {}
        for i, s in enumerate(schemes):
            if s.label.startswith("float32"):
                continue
            job = dict(label=s.label, scheme=vars(s), pipeline=str(path), threads=args.threads,
                       image=str(Path(tmp) / f"{i}.png"), steps=steps)
            done[s.label] = res = runner.run(job)
            log(f"[image] {s.label}: {res.get('error', 'ok')}")
        from PIL import Image

        ref = done.get(schemes[0].label, {})
        ref_image = Image.open(ref["image"]).convert("RGB") if "image" in ref else None
        for s in schemes:
            res = done.get(s.label)
            if res is None:
                continue
            label = "unquantized (reference, as saved)" if not s.quantized else s.label
            if "error" in res:
                rows.append([label, f"error: {res['error']}"])
            elif ref_image is None:
                rows.append([label, f"no reference image ({ref.get('error', '-')})"])
            else:
                rows.append([label, f"{psnr(Image.open(res['image']).convert('RGB'), ref_image):.1f}"])
    note = (f"{path.name}: prompt {PROMPT!r}, {steps} steps, seed {SEED}, 64x64, in the dtype it "
            "was saved in; only the transformer is quantized; PSNR of the 8-bit RGB image "
            "against the unquantized pipeline's.")
    return bt.section("images", machine, bt.md_table(["scheme", "image PSNR dB"], rows), note)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(run_job(job)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
