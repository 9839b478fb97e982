"""`syncdiffusion_utils.compiling`: regional compilation of the repeated blocks (counted; the images of eager within
float32 noise, the gradient pass included), the whole-model mode, and torch's compile caches in a stated folder
(found by a second process).

On the CPU the compiled pipelines run with the `aot_eager` backend: Dynamo's graphs and AOTAutograd's forward and
backward, without Inductor's code generation, which takes minutes here (a C++ build per graph: 113 s for one ResNet
block on this machine). The cache test uses Inductor on a module whose operations are all library calls (matrix
products), so that no C++ is built and it takes seconds."""

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch._dynamo.config as dynamo_config

from syncdiffusion_utils import compiling
from syncdiffusion_utils.loading import CLIError, load_pipeline


pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
# 64x128 pixels: 3 views at stride 4, two steps, the first synchronized: the exact mode's gradient pass runs through
# the compiled blocks' backward.
CALL = {"height": 64, "width": 128, "stride": 4, "num_inference_steps": 2, "sync_thres": 1, "output_type": "latent"}
# AOTAutograd decomposes some operations (group norm, ...) and rounds a little differently from eager: measured
# 1.4e-6 of the largest latent for the tiny SD pipeline (3 views, 2 steps, one synchronized, one thread), 1.1e-6 with
# 5 views and 3 steps, 0.0 for the tiny FLUX pipeline. A lost synchronization gradient (a backward returning zeros)
# moves them by 1.7e-2 (SD) and 4.1e-3 (FLUX); a 1% larger sync_weight by 1.6e-4 and 4.1e-5.
COMPILED_NOISE = 1e-5
needs_torch_2_14 = pytest.mark.skipif(
    tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) < (2, 14),
    reason="before torch 2.14 the aot_eager backend hands group_norm a strided tensor inside the compiled VAE"
    " decoder (a torch bug of that test backend, see tests/test_view_batches.py)",
)


def latents_of(pipe, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe("a photo of a forest", **{**CALL, **kwargs}, generator=generator).images


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def classes_in(model, names):
    return dict(Counter(type(m).__name__ for m in model.modules() if type(m).__name__ in names))


@pytest.fixture
def fresh_dynamo():
    """Each test compiles from nothing, and leaves no compiled graphs behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@torch.no_grad()
@needs_torch_2_14
def test_regional_compilation_gives_the_eager_images_and_no_block_falls_back_to_eager(pipe, fresh_dynamo):
    """Every ResNet and transformer block of the UNet and every ResNet block of the decoder is compiled (the UNet's
    own `_repeated_blocks` names only its transformer blocks); the exact mode's result, gradient pass included, is
    eager's; and no block function passed torch's default of 8 graphs unnoticed (it would then run eagerly)."""
    eager = latents_of(pipe, view_batch_size=2)
    names = compiling.REPEATED_BLOCKS + ("BasicTransformerBlock",)
    expected = {"unet": classes_in(pipe.unet, names), "vae.decoder": classes_in(pipe.vae.decoder, names)}
    assert expected == {
        "unet": {"BasicTransformerBlock": 4, "ResnetBlock2D": 8},
        "vae.decoder": {"ResnetBlock2D": 10},
    }
    assert pipe.unet._repeated_blocks == ["BasicTransformerBlock"]

    result = compiling.compile_pipeline(pipe, backend="aot_eager")
    assert result == {"mode": "regional", "models": expected}
    assert compiling.compiled_blocks(pipe.unet) == expected["unet"]
    assert compiling.compiled_blocks(pipe.vae.decoder) == expected["vae.decoder"]

    started = compiling.compile_seconds()
    with dynamo_config.patch(fail_on_recompile_limit_hit=True):  # a block past its limit raises instead
        compiled = latents_of(pipe, view_batch_size=2)
    assert compiling.compile_seconds() > started
    assert relative_error(compiled, eager) < COMPILED_NOISE

    from diffusers.models.resnet import ResnetBlock2D
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    graphs = len(_debug_get_cache_entry_list(ResnetBlock2D.forward.__code__))
    assert graphs > 8  # measured 33: past torch's default limit, some calls would have run eagerly
    compiling.uncompile_pipeline(pipe)
    assert compiling.compiled_blocks(pipe.unet) == {} and compiling.compiled_blocks(pipe.vae) == {}


@torch.no_grad()
@needs_torch_2_14
def test_regional_compilation_of_a_flux_pipeline_uses_its_repeated_blocks(fresh_dynamo):
    """The FLUX transformer names its blocks in `_repeated_blocks` (what diffusers' `compile_repeated_blocks`
    compiles): the same blocks here, and the synchronized panorama is eager's."""
    from pipeline_syncdiffusion_flux import SyncDiffusionFluxPipeline
    from syncdiffusion_utils.testing import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(pipeline_class=SyncDiffusionFluxPipeline)
    call = {"window_size": 64, "max_sequence_length": 32}
    eager = latents_of(pipe, **call)
    result = compiling.compile_pipeline(pipe, backend="aot_eager")
    transformer = pipe.transformer
    assert result["models"]["transformer"] == {
        "FluxTransformerBlock": len(transformer.transformer_blocks),
        "FluxSingleTransformerBlock": len(transformer.single_transformer_blocks),
    }
    assert result["models"]["vae.decoder"] == classes_in(pipe.vae.decoder, compiling.REPEATED_BLOCKS)
    started = compiling.compile_seconds()
    compiled = latents_of(pipe, **call)
    assert compiling.compile_seconds() > started
    assert relative_error(compiled, eager) < COMPILED_NOISE


def test_whole_mode_wraps_the_denoiser_and_the_decoder_and_is_undone(pipe):
    unet, decoder = pipe.unet, pipe.vae.decoder
    result = compiling.compile_pipeline(pipe, "whole", backend="aot_eager")
    assert result == {"mode": "whole", "models": {"unet": {"whole": 1}, "vae.decoder": {"whole": 1}}}
    assert pipe.unet._orig_mod is unet and pipe.vae.decoder._orig_mod is decoder
    compiling.uncompile_pipeline(pipe)
    assert pipe.unet is unet and pipe.vae.decoder is decoder


def test_bad_modes_and_missing_blocks_are_errors(pipe):
    with pytest.raises(ValueError, match="compile_mode='fast': expected one of regional, whole"):
        compiling.compile_pipeline(pipe, "fast")
    with pytest.raises(ValueError, match="none of the blocks"):
        compiling.compile_blocks(torch.nn.Linear(2, 2))
    assert compiling.compiled_blocks(pipe.unet) == {}  # nothing compiled by the failed calls


# ----------------------------------------------------------------------------------------------------------------
# The compile caches
# ----------------------------------------------------------------------------------------------------------------


def test_the_cache_folder_is_the_argument_then_ours_then_torchs_then_the_default(monkeypatch, tmp_path):
    for name in (compiling.CACHE_ENV, "TORCHINDUCTOR_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compiling.resolve_cache_dir() == str(tmp_path / "xdg" / "syncdiffusion" / "torch-compile")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch"))
    assert compiling.resolve_cache_dir() == str(tmp_path / "torch")
    monkeypatch.setenv(compiling.CACHE_ENV, str(tmp_path / "ours"))
    assert compiling.resolve_cache_dir() == str(tmp_path / "ours")
    assert compiling.resolve_cache_dir(tmp_path / "given") == str(tmp_path / "given")
    monkeypatch.setenv(compiling.CACHE_ENV, " ")
    with pytest.raises(ValueError, match="SYNCDIFFUSION_COMPILE_CACHE=' ': expected a folder"):
        compiling.resolve_cache_dir()
    (tmp_path / "a file").write_text("")
    with pytest.raises(ValueError, match="cannot create the folder"):
        compiling.setup_compile_cache(tmp_path / "a file" / "cache")


def test_load_pipeline_compiles_and_points_the_caches_at_the_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "restored after the test")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    pipe = load_pipeline("tiny", "cpu", compile=True, compile_cache=str(tmp_path / "given"), progress=False)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "given") and (tmp_path / "given").is_dir()
    assert compiling.compiled_blocks(pipe.unet) == {"BasicTransformerBlock": 4, "ResnetBlock2D": 8}
    monkeypatch.setenv(compiling.CACHE_ENV, str(tmp_path / "from env"))
    pipe = load_pipeline("tiny", "cpu", compile=True, compile_mode="whole", progress=False)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "from env")
    assert hasattr(pipe.unet, "_orig_mod") and compiling.compiled_blocks(pipe.unet._orig_mod) == {}


@pytest.mark.parametrize(
    "options, message",
    [
        ({"compile_mode": "whole"}, "--compile-mode: only with --compile"),
        ({"compile_cache": "x"}, "--compile-cache: only with --compile"),
        ({"compile": True, "compile_mode": "fast"}, "--compile-mode 'fast': choose one of regional, whole"),
    ],
)
def test_compile_options_are_checked_before_the_model_loads(options, message, monkeypatch):
    from syncdiffusion_utils import loading

    monkeypatch.setattr(loading, "_from_pretrained", lambda *args: pytest.fail("the model was loaded"))
    with pytest.raises(CLIError, match=message) as error:
        load_pipeline("some/model", "cpu", **options)
    assert error.value.code == 2


def test_the_command_passes_its_compile_flags_to_the_loader(monkeypatch, tmp_path):
    from syncdiffusion_utils import cli

    received = {}

    def load_pipeline(*args, **kwargs):
        received.update(kwargs)
        raise CLIError("stop here")

    monkeypatch.setattr(cli, "load_pipeline", load_pipeline)
    argv = ["a lake", "--model", "tiny", "-o", str(tmp_path / "x.png"), "--compile", "--compile-mode", "whole"]
    assert cli.main(argv + ["--compile-cache", str(tmp_path)]) == 1
    assert (received["compile"], received["compile_mode"], received["compile_cache"]) == (True, "whole", str(tmp_path))
    assert cli.main(argv[:-2]) == 1 and received["compile_mode"] is None  # the loader's default: regional


# A process that compiles a two-block model with Inductor in the given cache folder, runs it forward and backward,
# and prints what the caches did. Its blocks are bias-free linear layers: matrix products only, which Inductor
# hands to the BLAS library, so no C++ is compiled and the process takes seconds.
CACHED_PROCESS = textwrap.dedent(
    """
    import json, sys
    import torch
    from syncdiffusion_utils import compiling

    setup = compiling.setup_compile_cache(sys.argv[1])

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 8, bias=False)

        def forward(self, x):
            return self.linear(x)

    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(), Block())
    counts = compiling.compile_blocks(model, names=("Block",), backend="inductor")
    x = torch.randn(2, 8, requires_grad=True)
    model(x).sum().backward()
    from torch._dynamo.utils import counters
    caches = {**counters["inductor"], **counters["aot_autograd"]}
    print(json.dumps({"setup": setup, "counts": counts, "caches": caches, "grad": x.grad.tolist()}))
    """
)


def test_a_second_process_finds_what_the_first_compiled(tmp_path):
    folder = tmp_path / "compile-cache"
    env = {
        key: value for key, value in os.environ.items() if key not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])

    def run():
        done = subprocess.run(
            [sys.executable, "-c", CACHED_PROCESS, str(folder)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run()
    assert first["setup"]["directory"] == str(folder) and first["counts"] == {"Block": 2}
    assert first["setup"]["fx_graph_cache"] and first["setup"]["autograd_cache"]
    assert first["caches"].get("fxgraph_cache_miss", 0) > 0 and first["caches"].get("autograd_cache_saved", 0) > 0
    assert "fxgraph_cache_hit" not in first["caches"]
    written = [path for path in folder.rglob("*") if path.is_file()]
    assert written, "nothing was written to the cache folder"

    second = run()
    assert second["caches"].get("fxgraph_cache_hit", 0) > 0 and second["caches"].get("autograd_cache_hit", 0) > 0
    assert "fxgraph_cache_miss" not in second["caches"] and "autograd_cache_miss" not in second["caches"]
    assert second["grad"] == first["grad"]
