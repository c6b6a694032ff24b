"""``diffquant batch`` / ``diffquant.batch.run_batch`` on one machine: the shipped pipeline over a
small prompt file (tiny sizes, one step), records, failures, the PSNR against the unquantized
run, resuming after a run killed mid-write, prompt files refused by line, and the whole of it
with Ray unimportable. Ray itself: tests/test_batch_ray.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffquant.batch import read_prompts, run_batch
from diffquant.batch.worker import KILL_AFTER_ENV, BatchWorker
from diffquant.errors import ConfigError
from diffquant.report import psnr

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)

PROMPTS = [{"prompt": "a red circle above a blue square", "id": "red"},
           {"prompt": "a green triangle", "seed": 3},
           {"prompt": "a blue square", "seed": 1},
           {"prompt": "a yellow circle", "height": 48},
           {"prompt": "too small for the VAE", "height": 8},     # fails inside the pipeline
           {"prompt": "no such size", "width": -16}]             # refused before any call
RUN = dict(quantize=["torchao:int8wo"], steps=1, height=32, width=32, batch_size=2)


def write_prompts(path):
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """One in-process batch (quantized, with the unquantized reference); shared by the Ray tests."""
    tmp = tmp_path_factory.mktemp("batch")
    prompts = write_prompts(tmp / "prompts.jsonl")
    records = run_batch(prompts, tmp / "out", reference=True, parquet=True, progress=False, **RUN)
    return SimpleNamespace(prompts=prompts, out=tmp / "out", records=records)


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_records_images_and_failures(local_run):
    by_id = {r["id"]: r for r in local_run.records}
    assert list(by_id) == ["red", "00002", "00003", "00004", "00005", "00006"]
    assert [r["status"] for r in local_run.records] == ["ok"] * 4 + ["error"] * 2
    assert by_id["00005"]["error"].startswith("RuntimeError: ")  # the pipeline's own error
    assert by_id["00006"]["error"] == "ValueError: width is -16; expected a positive integer"
    assert [by_id[i]["batch"] for i in ("red", "00002", "00003", "00004")] == [2, 2, 1, 1]
    assert by_id["00004"]["size"] == [48, 32] and by_id["red"]["size"] == [32, 32]
    for r in local_run.records[:4]:
        assert r["scheme"] == "torchao:int8wo" and r["seconds"] > 0
        assert r["path"] == f"images/{r['id']}-{r['seed']}.png"
        image = pixels(local_run.out / r["path"])
        ref = pixels(local_run.out / "reference" / f"{r['id']}-{r['seed']}.png")
        assert 20 < r["psnr"] == round(psnr(image, ref), 3)  # quantized: close, not equal
    # the results file holds the same records; so does the parquet copy
    lines = (local_run.out / "results.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == local_run.records
    import pyarrow.parquet as pq

    table = pq.read_table(local_run.out / "results.parquet").to_pylist()
    assert [(r["id"], r["status"], r["psnr"]) for r in table] == \
        [(r["id"], r["status"], r.get("psnr")) for r in local_run.records]


def test_an_image_is_the_pipelines_own_for_its_seed(local_run):
    """A group of one: the reference image is exactly FluxPipeline's for that prompt and seed."""
    from diffquant import FluxPipeline, default_pipeline_path

    pipe = FluxPipeline.from_pretrained(default_pipeline_path(), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a blue square", num_inference_steps=1, height=32, width=32,
                 max_sequence_length=16,  # the shipped T5's length, which the CLI runs at
                 generator=torch.Generator().manual_seed(1)).images[0]
    assert np.array_equal(pixels(local_run.out / "reference" / "00003-1.png"), np.asarray(image))


def test_another_scheme_into_the_same_folder_is_refused(local_run):
    with pytest.raises(ConfigError, match=r"holds a batch made with quantize \['torchao:int8wo'\] "
                                          r"\(now \['gguf:q8_0'\]\)"):
        run_batch(local_run.prompts, local_run.out, **{**RUN, "quantize": ["gguf:q8_0"]},
                  reference=True, progress=False)


@pytest.mark.parametrize("text, match", [
    ('{"prompt": "a"}\n{"prompt": "b"\n', r"prompts.jsonl:2: not valid JSON"),
    ('{"prompt": "a", "sede": 1}\n',
     r"prompts.jsonl:1: unknown key\(s\) 'sede'; a line takes id, prompt, seed"),
    ('{"seed": 1}\n', r"prompts.jsonl:1: no 'prompt'"),
    ('{"prompt": "a", "steps": "4"}\n', r"prompts.jsonl:1: 'steps' is '4'; expected int"),
    ('{"prompt": "a", "seed": true}\n', r"prompts.jsonl:1: 'seed' is True; expected int"),
    ('{"prompt": "a", "id": "../x"}\n', r"prompts.jsonl:1: id '../x' cannot name a file"),
    ('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n',
     r"prompts.jsonl:2: id 'x' with seed 0 repeats line 1; both would write images/x-0.png"),
    ('\n', r"prompts.jsonl: no prompts"),
])
def test_bad_prompt_files_are_refused_by_line(tmp_path, text, match):
    (tmp_path / "prompts.jsonl").write_text(text)
    with pytest.raises(ConfigError, match=match):
        read_prompts(tmp_path / "prompts.jsonl")


def test_txt_prompts_and_defaults(tmp_path):
    (tmp_path / "p.txt").write_text("# a comment\na red circle\n\n  a blue square  \n")
    jobs = read_prompts(tmp_path / "p.txt", seed=5, steps=2, height=64)
    assert [(j.id, j.prompt, j.seed, j.steps, j.height) for j in jobs] == \
        [("00002", "a red circle", 5, 2, 64), ("00004", "a blue square", 5, 2, 64)]


class _Pipe:
    """A pipeline whose call fails when a prompt says "bad"."""

    calls = []

    def __call__(self, prompt, num_inference_steps, generator, output_type):
        self.calls.append(list(prompt))
        if any("bad" in p for p in prompt):
            raise ValueError("this prompt is bad")
        return SimpleNamespace(images=[Image.new("RGB", (4, 4), "red") for _ in prompt])


def test_a_failed_call_is_retried_one_prompt_at_a_time(tmp_path):
    worker = BatchWorker.__new__(BatchWorker)
    worker.out, worker.pipe, worker.reference, worker.scheme, worker.suffix = \
        tmp_path, _Pipe(), None, "fake", ".png"
    jobs = read_prompts(["good one", "bad one", "good two"])
    records = worker.run_group(jobs, skip={"00003-0"})
    assert _Pipe.calls == [["good one", "bad one", "good two"], ["good one"], ["bad one"]]
    assert [(r["id"], r["status"], r.get("error")) for r in records] == \
        [("00001", "ok", None), ("00002", "error", "ValueError: this prompt is bad")]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["00001-0.png"]


# A child whose `import ray` fails: the one-machine batch needs no Ray; --ray names the extra.
CHILD = textwrap.dedent("""
    import sys

    sys.modules["ray"] = None  # `import ray` raises ImportError, as without the package
    from diffquant.cli import main
    argv = [a for a in sys.argv[1:] if a != "--then-ray"]
    code = main(argv)
    if "--then-ray" in sys.argv:  # the same again with --ray: refused, naming the extra
        print("exit", code, file=sys.stderr)
        code = main(argv + ["--ray"])
    assert sys.modules["ray"] is None
    sys.exit(code)
""")


def batch_cli(*args, env=None):
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", CHILD, "batch", *map(str, args), "-q"],
                          capture_output=True, text=True, timeout=600, env=run_env)


def test_resume_after_a_killed_run_without_ray(local_run, tmp_path):
    out = tmp_path / "out"
    args = [local_run.prompts, out, "--quantize", "torchao:int8wo", "--steps", 1, "--height", 32,
            "--width", 32, "--batch-size", 2]
    killed = batch_cli(*args, env={KILL_AFTER_ENV: "2"})  # dies writing the third image
    assert killed.returncode == -9, killed.stderr
    names = sorted(p.name for p in (out / "images").iterdir())
    partial = [n for n in names if n.startswith(".")]
    assert [n for n in names if n not in partial] == ["00002-3.png", "red-0.png"]
    assert len(partial) == 1 and partial[0].startswith(".00003-1-") and ".partial" in partial[0]
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    done_mtime = (out / "images" / "red-0.png").stat().st_mtime_ns

    resumed = batch_cli(*args, "--then-ray")
    assert "exit 1" in resumed.stderr  # two prompts fail, as in the first run
    assert "2 of 6 prompt(s) failed" in resumed.stderr
    assert (out / "images" / "red-0.png").stat().st_mtime_ns == done_mtime  # skipped, not redone
    assert sorted(p.name for p in (out / "images").iterdir()) == \
        sorted(f"{r['id']}-{r['seed']}.png" for r in local_run.records[:4])  # no partial left
    for r in local_run.records[:4]:  # the same pixels as the unbroken in-process run
        assert np.array_equal(pixels(out / r["path"]), pixels(local_run.out / r["path"]))
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["id"], r["status"]) for r in records] == \
        [(r["id"], r["status"]) for r in local_run.records]

    assert resumed.returncode == 1  # then --ray, without Ray installed: which extra to install
    assert resumed.stderr.strip().splitlines()[-1] == (
        "diffquant: error: BackendUnavailableError: --ray needs Ray and Ray Data, which are not "
        "installed (import of ray halted; None in sys.modules); pip install 'diffquant[ray]'")
