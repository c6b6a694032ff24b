"""diffusers is an optional dependency: without it the native Flux pipeline loads, quantizes,
runs, saves and reloads, and a family that needs diffusers fails with an error naming the class
and the extra to install. The check runs in a child process whose imports of diffusers fail."""

import json
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoDiffusers(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "diffusers" or name.startswith("diffusers."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, NoDiffusers())
    import numpy as np
    import torch
    import diffquant
    from diffquant import AutoModel, DiffusionPipeline, FluxPipeline, default_pipeline_path
    from diffquant.errors import BackendUnavailableError
    from diffquant.quantizers import PipelineQuantizationConfig

    tmp = sys.argv[1]
    pipe = FluxPipeline.from_pretrained(default_pipeline_path(), quantization_config=
        PipelineQuantizationConfig(quant_backend="torchao", quant_kwargs={"quant_type": "int8wo"},
                                   components_to_quantize=["transformer"]))
    run = lambda p: p("a red circle", num_inference_steps=1, height=32, width=32,
                      generator=torch.Generator().manual_seed(0), output_type="np").images
    image = run(pipe)
    pipe.save_pretrained(tmp + "/flux")
    assert np.array_equal(run(DiffusionPipeline.from_pretrained(tmp + "/flux")), image)
    errors = []
    for load, path in [(AutoModel.from_pretrained, tmp + "/wan"),
                       (DiffusionPipeline.from_pretrained, tmp + "/wanpipe")]:
        try:
            load(path)
        except BackendUnavailableError as err:
            errors.append(str(err))
    try:
        diffquant.WanTransformer3DModel
    except AttributeError as err:
        errors.append(str(err))
    print(json.dumps({"errors": errors, "diffusers_imported": "diffusers" in sys.modules}))
""")


def test_flux_without_diffusers_and_the_error_for_other_families(tmp_path):
    (tmp_path / "wan").mkdir()
    (tmp_path / "wan" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    (tmp_path / "wanpipe").mkdir()
    (tmp_path / "wanpipe" / "model_index.json").write_text(json.dumps(
        {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["diffusers_imported"]
    model_error, pipeline_error, attribute_error = result["errors"]
    assert model_error.startswith("model class 'WanTransformer3DModel' is not implemented by "
                                  "diffquant; it loads through diffusers' own class, which needs "
                                  "the 'diffusers' package: pip install 'diffquant[diffusers]'")
    assert pipeline_error.startswith("pipeline class 'WanPipeline' is not implemented by diffquant")
    assert "pip install 'diffquant[diffusers]'" in pipeline_error
    assert "'WanTransformer3DModel'" in attribute_error
    assert "pip install 'diffquant[diffusers]'" in attribute_error
