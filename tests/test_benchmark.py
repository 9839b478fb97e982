"""The benchmark command: every mode on the tiny architecture, its JSON, its table and its pass checks."""

import inspect
import io
import json
import re
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest
import torch

from syncdiffusion_utils import benchmark
from syncdiffusion_utils.benchmark import MODES, PeakMemory, expected_passes, main


ROW_FIELDS = (
    "mode",
    "kwargs",
    "seconds",
    "ratio",
    "step_seconds",
    "sync_step_seconds",
    "step_ratio",
    "projected_ratio",
    "cpu_seconds",
    "cpu_ratio",
    "cpu_step_ratio",
    "cpu_projected_ratio",
    "passes",
    "passes_sync_step",
    "expected_sync_step",
    "expected_passes",
    "passes_match",
    "final_decode",
    "peak_mem_mib",
    "memory_kind",
)
ARGS = ["--arch", "tiny", "--height", "64", "--width", "128", "--stride", "4", "--steps", "2", "--sync-thres", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("benchmark") / "out.json"
    capture = pytest.MonkeyPatch()
    out, err = io.StringIO(), io.StringIO()
    capture.setattr(sys, "stdout", out)
    capture.setattr(sys, "stderr", err)
    try:
        code = main(ARGS + ["--json", str(path)])
    finally:
        capture.undo()
    return {"code": code, "json": json.loads(path.read_text()), "stdout": out.getvalue(), "stderr": err.getvalue()}


def test_every_mode_runs_with_every_field(report):
    assert report["code"] == 0  # every count equals its formula
    rows = report["json"]["rows"]
    assert [row["mode"] for row in rows] == list(MODES)
    for row in rows:
        assert set(ROW_FIELDS) <= set(row), row["mode"]
        assert row["passes_match"], row["mode"]
        assert row["seconds"] > 0 and row["peak_mem_mib"] is not None
        assert len(row["step_seconds"]) == 2
        assert row["final_decode"] == 1
    config = report["json"]["config"]
    assert config["num_views"] == 3 and config["steps"] == 2 and config["sync_thres"] == 1


def test_ratios_are_to_multidiffusion(report):
    rows = {row["mode"]: row for row in report["json"]["rows"]}
    reference = rows["multidiffusion"]
    assert reference["ratio"] == reference["step_ratio"] == reference["projected_ratio"] == 1.0
    for row in rows.values():
        assert row["ratio"] == pytest.approx(row["seconds"] / reference["seconds"])
        if row["mode"] == "multidiffusion":
            continue
        assert row["step_ratio"] == pytest.approx(row["sync_step_seconds"] / reference["md_step_seconds"])
        # 50 steps of which 5 synchronized, from the per-step figures
        assert row["projected_ratio"] == pytest.approx((45 + 5 * row["step_ratio"]) / 50)


def test_exact_counts_match_the_formula(report):
    n = report["json"]["config"]["num_views"]
    rows = {row["mode"]: row for row in report["json"]["rows"]}
    exact = rows["exact"]
    step = exact["passes_sync_step"]
    assert (step["unet_fwd"], step["unet_bwd"], step["dec_fwd"], step["dec_bwd"], step["lpips_fwd"]) == (
        2 * n - 1,
        n - 1,
        n,
        n - 1,
        n - 1,
    )
    # the second step is plain MultiDiffusion: N more UNet forwards
    assert exact["passes"]["unet_fwd"] == 3 * n - 1
    assert rows["multidiffusion"]["passes"]["unet_fwd"] == 2 * n
    assert rows["multidiffusion"]["passes_sync_step"] is None
    fast = rows["fast"]["passes_sync_step"]
    assert (fast["unet_fwd"], fast["unet_bwd"]) == (n, 0)
    assert rows["x0"]["passes_sync_step"]["unet_bwd"] == 0
    assert rows["reuse"]["passes_sync_step"]["unet_fwd"] == n
    ckpt = rows["exact+ckpt"]["passes_sync_step"]
    assert ckpt["unet_recompute"] == n - 1 and ckpt["unet_fwd"] == 3 * n - 2
    tiny = rows["fast+tiny-decoder+lpips256"]["passes"]
    assert tiny["vae_dec_fwd"] == 0 and tiny["sync_dec_fwd"] == n and tiny["sync_dec_bwd"] == n - 1
    assert tiny["lpips_sizes"] == [[64, 64]]  # 64-pixel views: nothing to shrink to 256
    pooled = rows["fast+tiny-decoder+downsample2"]["passes"]
    assert pooled["sync_dec_fwd"] == n and pooled["unet_bwd"] == 0
    assert pooled["lpips_sizes"] == [[32, 32]]  # the loss image decoded from a 2x pooled latent


def test_table_and_progress(report):
    table = report["stdout"]
    for mode in MODES:
        assert f"\n{mode} " in table
    assert "N=3 views" in table
    assert "2N-1=5" in table and "projected" in table
    for index, mode in enumerate(MODES, 1):
        assert f"[{index}/{len(MODES)}] {mode}: " in report["stderr"]


def test_mode_subset_keeps_multidiffusion_first(tmp_path):
    path = tmp_path / "subset.json"
    assert main(ARGS + ["--modes", "fast", "--no-warmup", "--no-decode", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [row["mode"] for row in rows] == ["multidiffusion", "fast"]
    assert all(row["final_decode"] == 0 for row in rows)
    with pytest.raises(ValueError, match="unknown modes"):
        benchmark.run_benchmark(modes=["exact", "turbo"], progress=None)


def test_expected_passes_formula():
    per_step, total = expected_passes({}, num_views=5, steps=50, sync_thres=5)
    assert (per_step["unet_fwd"], per_step["unet_bwd"], per_step["dec_fwd"], per_step["dec_bwd"]) == (9, 4, 5, 4)
    assert total["unet_fwd"] == 5 * 9 + 45 * 5
    per_step, total = expected_passes({"sync_weight": 0.0}, num_views=5, steps=50, sync_thres=5)
    assert per_step is None and total["unet_fwd"] == 250 and total["dec_fwd"] == 0
    per_step, _ = expected_passes({"sync_mode": "fast", "sync_decoder": object()}, 5, 2, 2)
    assert (per_step["unet_fwd"], per_step["unet_bwd"], per_step["dec_fwd"]) == (5, 0, 5)


def test_peak_memory_sees_an_allocation():
    with PeakMemory("cpu", interval=0.001) as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page written
        time.sleep(0.05)  # for the sampling thread
        del block
    assert memory.peak_mib >= 48


# ----------------------------------------------------------------------------------------------------------------
# SDXL: the real architecture at a tiny width
# ----------------------------------------------------------------------------------------------------------------

# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json, vae/config.json, text_encoder(_2)/config.json
SDXL_BASE_UNET = {
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20),
    "addition_time_embed_dim": 256,
    "cross_attention_dim": 2048,
    "projection_class_embeddings_input_dim": 2816,
}
SDXL_ARGS = ["--arch", "sdxl", "--width-mult", "0.05", "--sample-size", "8", "--height", "64", "--width", "128"]
SDXL_ARGS += ["--stride", "4", "--steps", "2", "--sync-thres", "1", "--modes", "exact", "--no-warmup", "--no-decode"]


def test_sdxl_preset_is_sdxl_base():
    from syncdiffusion_utils.testing import XL_PRESETS, _scaled

    preset = XL_PRESETS["sdxl"]
    full_width = {
        "block_out_channels": _scaled(preset.unet_channels, 1.0, preset.norm_num_groups),
        "down_block_types": preset.unet_down,
        "up_block_types": preset.unet_up,
        "transformer_layers_per_block": preset.transformer_layers_per_block,
        "layers_per_block": preset.layers_per_block,
        "attention_head_dim": preset.attention_heads,  # SDXL's config names head counts so
        "addition_time_embed_dim": preset.addition_time_embed_dim,
        "cross_attention_dim": sum(preset.text_hidden),
        "projection_class_embeddings_input_dim": 6 * preset.addition_time_embed_dim + preset.text_hidden[1],
    }
    assert full_width == SDXL_BASE_UNET
    assert (preset.vae_channels, preset.vae_layers_per_block) == ((128, 256, 512, 512), 2)
    assert (preset.text_hidden, preset.text_layers, preset.text_heads) == ((768, 1280), (12, 32), (12, 20))
    assert benchmark.ARCH_DEFAULTS["sdxl"]["sample_size"] == 128  # SDXL's 1024-pixel window


def test_sdxl_arch_counts_as_expected(tmp_path, capsys):
    path = tmp_path / "sdxl.json"
    assert main(SDXL_ARGS + ["--json", str(path)]) == 0
    report = json.loads(path.read_text())
    config, rows = report["config"], {row["mode"]: row for row in report["rows"]}
    assert config["pipeline"] == "SyncDiffusionXLPipeline" and config["arch"] == "sdxl" and config["num_views"] == 3
    assert list(rows) == ["multidiffusion", "exact"]
    assert all(row["passes_match"] for row in rows.values())
    step = rows["exact"]["passes_sync_step"]
    assert (step["unet_fwd"], step["unet_bwd"], step["dec_fwd"], step["dec_bwd"], step["lpips_fwd"]) == (5, 2, 3, 2, 2)
    assert rows["multidiffusion"]["passes"]["unet_fwd"] == 6
    assert "SyncDiffusionXLPipeline arch=sdxl" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# ControlNet: its passes counted like the UNet's
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def controlnet_pipe():
    return benchmark.build_pipeline("tiny", controlnet=True)


def test_controlnet_counts_as_expected(controlnet_pipe, tmp_path, capsys, monkeypatch):
    def build_pipeline(*args):  # the command's call, answered with the module's pipeline (built once)
        assert args[-1] is True, "--controlnet did not reach build_pipeline"
        return controlnet_pipe

    monkeypatch.setattr(benchmark, "build_pipeline", build_pipeline)
    path = tmp_path / "controlnet.json"
    modes = ["--modes", "exact,exact+ckpt,fast", "--no-warmup", "--no-decode"]
    assert main(ARGS + ["--controlnet"] + modes + ["--json", str(path)]) == 0
    report = json.loads(path.read_text())
    n = report["config"]["num_views"]
    assert report["config"]["pipeline"] == "SyncDiffusionControlNetPipeline" and report["config"]["controlnet"]
    rows = {row["mode"]: row for row in report["rows"]}
    assert all(row["passes_match"] for row in rows.values())
    exact = rows["exact"]["passes_sync_step"]
    assert (exact["controlnet_fwd"], exact["controlnet_bwd"]) == (2 * n - 1, n - 1)  # the UNet's
    ckpt = rows["exact+ckpt"]["passes_sync_step"]
    assert (ckpt["controlnet_recompute"], ckpt["controlnet_fwd"]) == (n - 1, 3 * n - 2)
    fast = rows["fast"]["passes_sync_step"]
    assert (fast["controlnet_fwd"], fast["controlnet_bwd"]) == (n, 0)
    # MultiDiffusion: one ControlNet pass per view and step, two steps
    assert rows["multidiffusion"]["passes"]["controlnet_fwd"] == 2 * n
    assert "cn fwd" in capsys.readouterr().out


def test_controlnet_counter_follows_the_pipeline(controlnet_pipe):
    """Counted in the pipeline itself: `guess_mode` (conditional rows only) counts as much per view; a ControlNet that
    does not run (scale 0) counts nothing."""
    from syncdiffusion_utils.counting import PassCounter, expected_sync_step

    pipe = controlnet_pipe
    call = {"prompt": "a lake", "height": 64, "width": 128, "stride": 4, "num_inference_steps": 1}
    call.update(output_type="latent", image=torch.rand(1, 3, 64, 128))
    keys = ("unet_fwd", "unet_bwd", "controlnet_fwd", "controlnet_recompute", "controlnet_bwd")
    for kwargs, controlnet in (({"guess_mode": True}, True), ({"controlnet_conditioning_scale": 0.0}, False)):
        with PassCounter(pipe) as counter:
            pipe(**call, **kwargs)
        expected = expected_sync_step(3, controlnet=controlnet)
        assert {key: counter.as_dict()[key] for key in keys} == {key: expected[key] for key in keys}, kwargs
    with pytest.raises(ValueError, match="panorama-pipeline"):
        benchmark.run_benchmark(controlnet=True, modes=["panorama-pipeline"], progress=None)


def test_panorama_pipeline_reference_and_per_mode_view_batches():
    """The goal-1 rows: diffusers' panorama pipeline fully batched as the reference, then modes at `@1` and `@auto`,
    each on the same latents with the passes of MultiDiffusion (its fixed 64-latent window and stride 8)."""
    rows = benchmark.run_benchmark(
        sample_size=64,
        height=512,
        width=576,
        stride=8,
        steps=1,
        sync_thres=0,
        decode=False,
        warmup=False,
        modes=["multidiffusion@1", "multidiffusion@auto"],
        reference="panorama-pipeline",
        progress=None,
    )
    assert [row["mode"] for row in rows] == ["panorama-pipeline", "multidiffusion@1", "multidiffusion@auto"]
    assert rows[0]["kwargs"]["view_batch_size"] == 2 and rows[2]["kwargs"]["view_batch_size"] == "auto"
    assert all(row["passes_match"] and row["passes"]["unet_fwd"] == 2 for row in rows)
    assert rows[0]["ratio"] == 1.0 and rows.config["reference"] == "panorama-pipeline"
    with pytest.raises(ValueError, match="64-latent window"):
        benchmark.run_benchmark(modes=["panorama-pipeline"], steps=1, warmup=False, progress=None)


def test_a_mode_that_fails_gets_an_error_row_and_the_others_run(monkeypatch):
    """Out of memory (on an emulated small card) or a float16 overflow ends that mode only, with a row saying so."""
    pipe = benchmark.build_pipeline("tiny")
    calls = []

    def overflow(*args, **kwargs):
        calls.append(1)
        raise FloatingPointError("the synchronization gradient overflowed in float16")

    monkeypatch.setattr(pipe, "synchronize_views", overflow)
    rows = benchmark.run_benchmark(
        pipe=pipe,
        modes=["exact", "multidiffusion@2"],
        steps=1,
        sync_thres=1,
        warmup=False,
        decode=False,
        progress=None,
    )
    assert [row["mode"] for row in rows] == ["multidiffusion", "exact", "multidiffusion@2"] and calls == [1]
    assert rows[1]["error"] == "FloatingPointError: the synchronization gradient overflowed in float16"
    assert not rows[1]["passes_match"] and rows[2]["passes_match"] and rows[2]["seconds"] > 0
    table = benchmark.format_table(rows.config, rows).splitlines()
    assert table[-2].split()[:2] == ["exact", "error"]


# ----------------------------------------------------------------------------------------------------------------
# FLUX: the real architecture at a tiny width and depth, transformer passes, FluxPipeline at the panorama's size
# ----------------------------------------------------------------------------------------------------------------

# 1 attention head of 128 (FLUX.1: 24), 1 double + 2 single blocks (19 + 38), 64-pixel views: 3 views at stride 4.
FLUX_ARGS = ["--arch", "flux", "--width-mult", "0.0417", "--depth-mult", "0.05", "--sample-size", "8"]
FLUX_ARGS += ["--height", "64", "--width", "128", "--stride", "4", "--steps", "2", "--sync-thres", "1"]
FLUX_ARGS += ["--max-sequence-length", "16", "--no-warmup"]


def run_main(args):
    """`main(args)` with its output captured; `(exit code, the JSON report, standard output)`."""
    capture = pytest.MonkeyPatch()
    out = io.StringIO()
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/out.json"
        capture.setattr(sys, "stdout", out)
        capture.setattr(sys, "stderr", io.StringIO())
        try:
            code = main(args + ["--json", path])
        finally:
            capture.undo()
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    return code, report, out.getvalue()


@pytest.fixture(scope="module")
def flux_report():
    """The FLUX benchmark's default modes, and then every other mode, on the tiny FLUX architecture."""
    default = run_main(FLUX_ARGS)
    others = [m for m in MODES if m not in benchmark.FLUX_MODES]
    rest = run_main(FLUX_ARGS + ["--modes", ",".join(others), "--no-decode"])
    return {"default": default, "rest": rest}


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_flux_rows_count_the_transformer_as_the_formulas(flux_report):
    code, report, table = flux_report["default"]
    config, rows = report["config"], {row["mode"]: row for row in report["rows"]}
    assert code == 0 and list(rows) == list(benchmark.FLUX_MODES)
    assert config["pipeline"] == "SyncDiffusionFluxPipeline" and config["denoiser"] == "transformer"
    assert config["num_views"] == 3 and config["transformer_blocks"] == [1, 2] and config["transformer_heads"] == 1
    assert all(row["passes_match"] for row in rows.values())
    n = config["num_views"]
    for mode, row in rows.items():
        assert row["passes"]["unet_fwd"] == 0, mode  # the transformer's passes are the transformer's
        assert row["final_decode"] == 1, mode

    def step(mode):
        counts = rows[mode]["passes_sync_step"]
        return tuple(counts[key] for key in benchmark.TRANSFORMER_PASS_KEYS)

    assert step("exact") == (2 * n - 1, n - 1, n, n - 1, n - 1)
    assert rows["exact+ckpt"]["passes_sync_step"]["transformer_recompute"] == n - 1
    assert step("exact+ckpt") == (3 * n - 2, n - 1, 2 * n - 1, n - 1, n - 1)  # transformer and decoder recomputed
    assert step("fast") == (n, 0, n, n - 1, n - 1)
    tiny = rows[benchmark.TINY_DECODER_MODE]["passes"]
    assert tiny["vae_dec_fwd"] == 0 and (tiny["sync_dec_fwd"], tiny["sync_dec_bwd"]) == (n, n - 1)
    # MultiDiffusion: one transformer pass per view and step; the second step of every mode is MultiDiffusion's
    assert rows["multidiffusion"]["passes"]["transformer_fwd"] == 2 * n
    assert rows["exact"]["passes"]["transformer_fwd"] == 3 * n - 1
    assert "tr fwd" in table and "transformer fwd 2N-1=5" in table and "1 double + 2 single blocks" in table


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_flux_other_modes_count_as_the_formulas(flux_report):
    code, report, _ = flux_report["rest"]
    rows = {row["mode"]: row for row in report["rows"]}
    assert code == 0 and list(rows) == ["multidiffusion", "x0", "reuse", "fast+tiny-decoder+downsample2"]
    assert all(row["passes_match"] for row in rows.values())
    n = report["config"]["num_views"]
    assert rows["x0"]["passes_sync_step"]["transformer_bwd"] == 0
    assert rows["x0"]["passes_sync_step"]["transformer_fwd"] == 2 * n - 1
    assert rows["reuse"]["passes_sync_step"]["transformer_fwd"] == n
    assert rows["fast+tiny-decoder+downsample2"]["passes"]["lpips_sizes"] == [[32, 32]]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_flux_pipeline_row_is_flux_pipeline_at_the_panorama_size(flux_report):
    """The reference row: diffusers' FluxPipeline on the same transformer, one pass of the whole 64x128 image per step
    (32 image tokens; a view has 16), with its own ratios."""
    _, report, _ = flux_report["default"]
    rows = {row["mode"]: row for row in report["rows"]}
    row = rows[benchmark.FLUX_PIPELINE_MODE]
    assert row["passes_match"] and row["passes_sync_step"] is None
    assert (row["passes"]["transformer_fwd"], row["passes"]["final_decode"], row["passes"]["dec_fwd"]) == (2, 1, 0)
    assert row["projected_ratio"] == pytest.approx(row["step_ratio"])  # its steps priced at its own step time

    pipe = benchmark.build_pipeline("flux", width_mult=0.0417, depth_mult=0.05)
    tokens = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: tokens.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
    )
    call = {"sample_size": 8, "height": 64, "width": 128, "stride": 4, "steps": 1, "sync_thres": 0}
    rows = benchmark.run_benchmark(
        "flux", pipe=pipe, modes=["flux-pipeline"], warmup=False, max_sequence_length=16, progress=None, **call
    )
    assert [row["mode"] for row in rows] == ["multidiffusion", "flux-pipeline"]
    assert tokens == [16, 16, 16, 32]  # three 64-pixel views, then the whole panorama
    assert all(row["passes_match"] for row in rows)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_flux_true_cfg_counts_one_view_pass_per_guided_view(lpips_module):
    """True CFG runs the transformer twice per view (positive, negative): each call counts half, so the counts are
    the formulas', checkpointed recomputation included; FluxPipeline, which does not say, is told with `guided`."""
    from diffusers import FluxPipeline

    from pipeline_syncdiffusion_flux import SyncDiffusionFluxPipeline
    from syncdiffusion_utils.counting import PassCounter, expected_plain_step, expected_sync_step
    from syncdiffusion_utils.testing import make_flux_components

    pipe = SyncDiffusionFluxPipeline(**make_flux_components("tiny"))
    pipe.set_perceptual_loss(lpips_module)
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": "a lake", "height": 64, "width": 128, "window_size": 64, "stride": 4, "num_inference_steps": 1}
    call.update(max_sequence_length=16, output_type="latent", negative_prompt="fog", true_cfg_scale=4.0)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *args: calls.append(1))
    for kwargs, expected in (
        ({}, expected_sync_step(3, "transformer", denoiser="transformer")),
        ({"sync_gradient_checkpointing": True}, expected_sync_step(3, checkpointing=True, denoiser="transformer")),
        ({"sync_weight": 0.0}, expected_plain_step(3, denoiser="transformer")),
    ):
        calls.clear()
        with PassCounter(pipe) as counter:
            pipe(**call, **kwargs)
        counts = counter.as_dict()
        assert {key: counts[key] for key in expected} == expected, kwargs
        assert len(calls) == 2 * counts["transformer_fwd"] - 2 * counts["transformer_recompute"], kwargs

    flux = FluxPipeline(**pipe.components)
    flux.set_progress_bar_config(disable=True)
    flux_call = {k: v for k, v in call.items() if k not in ("window_size", "stride")}
    for guided, expected in ((True, 1), (None, 2)):  # unsaid, each of its two calls counts one
        with PassCounter(flux, guided=guided) as counter:
            flux(**flux_call)
        assert counter.transformer_fwd == expected, guided


def test_flux_preset_is_the_flux_default_panorama():
    from pipeline_syncdiffusion_flux import SyncDiffusionFluxPipeline, get_views

    preset = benchmark.PRESETS["flux-default"]
    call = inspect.signature(SyncDiffusionFluxPipeline.__call__).parameters
    assert (preset["height"], preset["width"]) == (call["height"].default, call["width"].default) == (1024, 4096)
    assert preset["steps"] == call["num_inference_steps"].default == 28
    assert preset["sync_thres"] == call["sync_thres"].default == 5
    assert preset["dtype"] == "bfloat16" and preset["full_text_encoders"] and preset["view_batch_size"] == "auto"
    assert preset["modes"] == list(benchmark.FLUX_MODES) and "flux-pipeline" in preset["modes"]
    assert benchmark.ARCH_DEFAULTS["flux"]["sample_size"] == 128  # FLUX's 1024-pixel window
    assert len(get_views(1024 // 8, 4096 // 8, 128, preset["stride"])) == 13  # docs/flux.md's 13 views
    assert benchmark.parse_args(["--preset", "flux-default"]).preset == "flux-default"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"arch": "flux", "modes": ["panorama-pipeline"]}, "panorama-pipeline: not for arch='flux'"),
        ({"arch": "tiny", "modes": ["flux-pipeline"]}, "flux-pipeline is FluxPipeline: for arch='flux' only"),
        ({"arch": "flux", "modes": ["flux-pipeline@2"]}, "no views to batch"),
        ({"arch": "tiny", "depth_mult": 0.5}, "depth_mult=0.5: for arch='flux', 'flux2-klein' or 'z-image' only"),
        ({"arch": "flux", "depth_mult": 0.0}, "depth_mult=0.0: a positive number"),
        ({"arch": "flux", "max_sequence_length": 0}, "max_sequence_length=0"),
        ({"arch": "flux", "controlnet": True}, "controlnet: not for arch='flux'"),
        ({"arch": "flux", "channels_last": True}, "channels_last: not for arch='flux'"),
        ({"arch": "tiny", "modes": ["z-image-pipeline"]}, "z-image-pipeline is ZImagePipeline: for arch='z-image'"),
        ({"arch": "z-image", "modes": ["flux2-klein-pipeline"]}, "is Flux2KleinPipeline: for arch='flux2-klein'"),
        ({"arch": "flux2-klein", "modes": ["flux-pipeline"]}, "flux-pipeline is FluxPipeline: for arch='flux'"),
        ({"arch": "z-image", "modes": ["z-image-pipeline@auto"]}, "no views to batch"),
        ({"arch": "flux2-klein", "modes": ["panorama-pipeline"]}, "panorama-pipeline: not for arch='flux2-klein'"),
        ({"arch": "z-image", "controlnet": True}, "controlnet: not for arch='z-image'"),
        ({"arch": "z-image", "offload_text_encoder": True}, "offload_text_encoder: not for arch='z-image'"),
        ({"arch": "flux2-klein", "depth_mult": -1.0}, "depth_mult=-1.0: a positive number"),
        ({"arch": "z-image", "max_sequence_length": 513}, "max_sequence_length=513"),
    ],
)
def test_flux_options_are_checked_before_anything_is_built(options, message, monkeypatch):
    def build_pipeline(*args, **kwargs):
        raise AssertionError("built before the options were checked")

    monkeypatch.setattr(benchmark, "build_pipeline", build_pipeline)
    with pytest.raises(ValueError, match=re.escape(message)):
        benchmark.run_benchmark(progress=None, **options)


# ----------------------------------------------------------------------------------------------------------------
# FLUX.2 [klein] and Z-Image: their real architectures reduced, transformer passes, their diffusers pipelines
# ----------------------------------------------------------------------------------------------------------------

# 1 attention head of 128 (klein-4B: 24, Z-Image-Turbo: 30); klein 1 double + 1 single block (5 + 20), Z-Image 2
# layers + 1 + 1 refiners (30 + 2 + 2); 64-pixel views: 3 views at stride 4.
REDUCED = {"flux2-klein": ["--width-mult", "0.0417"], "z-image": ["--width-mult", "0.0334"]}
REDUCED_ARGS = ["--depth-mult", "0.05", "--sample-size", "8", "--height", "64", "--width", "128", "--stride", "4"]
REDUCED_ARGS += ["--steps", "2", "--sync-thres", "1", "--max-sequence-length", "16", "--no-warmup"]
PIPELINES = {"flux2-klein": "SyncDiffusionFlux2KleinPipeline", "z-image": "SyncDiffusionZImagePipeline"}
REDUCED_BLOCKS = {"flux2-klein": [1, 1], "z-image": [2, 1]}


@pytest.fixture(scope="module", params=["flux2-klein", "z-image"])
def transformer_report(request):
    arch = request.param
    return arch, run_main(["--arch", arch, *REDUCED[arch], *REDUCED_ARGS])


# The decoder's full backward hook also fires where only its output needs a gradient; torch says so.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_flux2_klein_and_z_image_rows_count_the_transformer_as_the_formulas(transformer_report):
    arch, (code, report, table) = transformer_report
    config, rows = report["config"], {row["mode"]: row for row in report["rows"]}
    assert code == 0 and list(rows) == list(benchmark.ARCH_MODES[arch])
    assert config["pipeline"] == PIPELINES[arch] and config["denoiser"] == "transformer"
    assert config["num_views"] == 3 and config["transformer_blocks"] == REDUCED_BLOCKS[arch]
    assert config["transformer_heads"] == 1 and config["transformer_width"] == 128
    assert config["guidance_scale"] == benchmark.GUIDANCE_SCALES[arch]
    assert all(row["passes_match"] for row in rows.values())
    n = config["num_views"]

    def step(mode):
        counts = rows[mode]["passes_sync_step"]
        return tuple(counts[key] for key in benchmark.TRANSFORMER_PASS_KEYS)

    # Z-Image's backwards are counted through the tensors of its transformer's list output
    assert step("exact") == (2 * n - 1, n - 1, n, n - 1, n - 1)
    assert rows["exact+ckpt"]["passes_sync_step"]["transformer_recompute"] == n - 1
    assert step("exact+ckpt") == (3 * n - 2, n - 1, 2 * n - 1, n - 1, n - 1)
    assert step("fast") == (n, 0, n, n - 1, n - 1)
    tiny = rows[benchmark.TINY_DECODER_MODE]["passes"]
    assert tiny["vae_dec_fwd"] == 0 and (tiny["sync_dec_fwd"], tiny["sync_dec_bwd"]) == (n, n - 1)
    assert rows["multidiffusion"]["passes"]["transformer_fwd"] == 2 * n
    for mode, row in rows.items():
        assert row["passes"]["unet_fwd"] == 0 and row["final_decode"] == 1, mode
    # diffusers' pipeline: one guided pass of the whole panorama per step (Flux2KleinPipeline's two calls, each
    # half; ZImagePipeline's doubled list of images)
    reference = rows[f"{arch}-pipeline"]
    assert reference["passes_sync_step"] is None and reference["passes"]["transformer_fwd"] == 2
    assert f"{arch}-pipeline: diffusers' {benchmark.REFERENCE_PIPELINES[arch + '-pipeline']}" in table
    assert "transformer fwd 2N-1=5" in table and "classifier-free guidance" in table


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("arch", ["flux2-klein", "z-image"])
def test_diffusers_pipeline_rows_make_the_whole_panorama_from_the_same_noise(arch):
    """The reference row runs diffusers' own pipeline on the same components: three 64-pixel views of 16 tokens
    each, then the whole 64x128 panorama's 32 tokens, its transformer called as that pipeline calls it (FLUX.2:
    twice per step under guidance; Z-Image: a list of one latent per image, positive and negative), from the
    panorama's initial noise."""
    pipe = benchmark.build_pipeline(arch, width_mult=float(REDUCED[arch][1]), depth_mult=0.05)
    calls = []

    def record(module, args, kwargs):
        latents = kwargs["hidden_states"] if arch == "flux2-klein" else args[0]
        calls.append((type(latents).__name__, len(latents), latents[0].shape))

    pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    noise = []
    diffusers_class = getattr(__import__("diffusers"), benchmark.REFERENCE_PIPELINES[f"{arch}-pipeline"])
    original = diffusers_class.prepare_latents
    call = {"sample_size": 8, "height": 64, "width": 128, "stride": 4, "steps": 1, "sync_thres": 0}
    with pytest.MonkeyPatch.context() as patch:

        def prepare_latents(self, *args, **kwargs):
            noise.append(kwargs.get("latents", args[-1] if args else None))
            return original(self, *args, **kwargs)

        patch.setattr(diffusers_class, "prepare_latents", prepare_latents)
        rows = benchmark.run_benchmark(
            arch, pipe=pipe, modes=[f"{arch}-pipeline"], warmup=False, max_sequence_length=16, progress=None, **call
        )
    assert [row["mode"] for row in rows] == ["multidiffusion", f"{arch}-pipeline"]
    assert all(row["passes_match"] for row in rows)
    generator = torch.Generator("cpu").manual_seed(0)
    expected = torch.randn((1, pipe.vae.config.latent_channels, 8, 16), generator=generator)
    if arch == "flux2-klein":
        # token batches: each view's 16 tokens (4x4 patches), positive then negative, then the panorama's 32
        assert calls == [("Tensor", 1, torch.Size([16, 128]))] * 6 + [("Tensor", 1, torch.Size([32, 128]))] * 2
        expected = pipe._patchify_latents(expected)
    else:
        # the views' doubled batches as one tensor, then ZImagePipeline's list of 2 latents (16, 1, 8, 16)
        assert calls == [("Tensor", 2, torch.Size([16, 1, 8, 8]))] * 3 + [("list", 2, torch.Size([16, 1, 8, 16]))]
    assert len(noise) == 1 and torch.equal(noise[0], expected)


@pytest.mark.parametrize(
    "preset, arch, pipeline",
    [
        ("flux2-klein-default", "flux2-klein", "SyncDiffusionFlux2KleinPipeline"),
        ("z-image-default", "z-image", "SyncDiffusionZImagePipeline"),
    ],
)
def test_flux2_klein_and_z_image_presets_are_their_pipelines_default_panoramas(preset, arch, pipeline):
    module = __import__("pipeline_syncdiffusion_flux2" if arch == "flux2-klein" else "pipeline_syncdiffusion_z_image")
    pipeline_class = getattr(module, pipeline)
    options = benchmark.PRESETS[preset]
    call = inspect.signature(pipeline_class.__call__).parameters
    assert options["arch"] == arch
    assert (options["height"], options["width"]) == (call["height"].default, call["width"].default) == (1024, 4096)
    assert options["steps"] == call["num_inference_steps"].default == 50
    assert options["sync_thres"] == call["sync_thres"].default == 5
    assert options["guidance_scale"] == call["guidance_scale"].default == benchmark.GUIDANCE_SCALES[arch]
    # the 1024-pixel window (default_sample_size 128 latents) and its default stride
    assert benchmark.ARCH_DEFAULTS[arch]["sample_size"] == 128
    assert options["stride"] == pipeline_class.default_stride(SimpleNamespace(vae_scale_factor=8), 1024) == 32
    assert len(module.get_views(1024 // 8, 4096 // 8, 128, options["stride"])) == 13
    assert options["dtype"] == "bfloat16" and options["full_text_encoders"] and options["view_batch_size"] == "auto"
    assert options["modes"] == list(benchmark.ARCH_MODES[arch]) and f"{arch}-pipeline" in options["modes"]
    args = benchmark.parse_args(["--preset", preset])
    assert args.preset == preset and benchmark.parse_args(["--arch", arch]).arch == arch


# ----------------------------------------------------------------------------------------------------------------
# Compiled modes: after the eager ones, first call and steady state, compiling time
# ----------------------------------------------------------------------------------------------------------------


def test_compiled_modes_follow_the_eager_ones_with_the_same_passes(tmp_path):
    """`compile=True` (`--compile`) adds every mode again, `+compiled`, after the eager ones: regional compilation
    (Dynamo's eager backend here; Inductor on a GPU), two calls each. The first compiled call compiles, the second
    compiles nothing; the counts are unchanged; the pipeline is eager again afterwards."""
    from syncdiffusion_utils import compiling

    pipe = benchmark.build_pipeline("tiny")
    torch._dynamo.reset()
    try:
        rows = benchmark.run_benchmark(
            pipe=pipe,
            modes=["exact"],
            compile=True,
            compile_backend="eager",
            compile_cache=str(tmp_path / "cache"),
            repeat=2,
            height=64,
            width=128,
            stride=4,
            steps=2,
            sync_thres=1,
            warmup=False,
            decode=False,
            progress=None,
        )
    finally:
        torch._dynamo.reset()
    names = ["multidiffusion", "exact", "multidiffusion+compiled", "exact+compiled"]
    assert [row["mode"] for row in rows] == names
    by_mode = {row["mode"]: row for row in rows}
    for mode in ("multidiffusion", "exact"):
        eager, compiled = by_mode[mode], by_mode[mode + "+compiled"]
        assert eager["passes_match"] and compiled["passes_match"]
        assert compiled["passes"] == eager["passes"] and compiled["passes_sync_step"] == eager["passes_sync_step"]
        assert eager["compile_seconds"] == 0
        assert [call["compile_seconds"] > 0 for call in compiled["calls"]] == [True, False]
        assert compiled["first_call_seconds"] == compiled["calls"][0]["seconds"]
        assert compiled["steady_seconds"] == compiled["calls"][1]["seconds"]
    config = rows.config
    assert config["compile_mode"] == "regional" and config["compile_cache"] == str(tmp_path / "cache")
    assert config["compiled_blocks"]["unet"] == {"BasicTransformerBlock": 4, "ResnetBlock2D": 8}
    assert compiling.compiled_blocks(pipe.unet) == {} and compiling.compiled_blocks(pipe.vae) == {}
    table = benchmark.format_table(config, rows)
    assert "\nexact+compiled " in table and "'+compiled': the same mode after the eager ones" in table


def test_compile_flags_need_a_compiled_mode_and_the_reference_is_eager():
    with pytest.raises(SystemExit):
        benchmark.parse_args(ARGS + ["--compile-mode", "whole"])
    assert (
        benchmark.parse_args(ARGS + ["--modes", "exact+compiled", "--compile-mode", "whole"]).compile_mode == "whole"
    )
    assert benchmark.parse_args(ARGS + ["--compile"]).compile_mode == "regional"
    with pytest.raises(ValueError, match="reference='exact\\+compiled'"):
        benchmark.run_benchmark(reference="exact+compiled", progress=None)
    with pytest.raises(ValueError, match="compile_mode='fast'"):
        benchmark.run_benchmark(compile=True, compile_mode="fast", progress=None)


# ----------------------------------------------------------------------------------------------------------------
# Region prompts: every mode again with regions, passes against the region formula, cost against the plain mode
# ----------------------------------------------------------------------------------------------------------------


def test_regions_rows_count_as_the_region_formula_and_cost_against_the_plain_mode():
    """`--regions 2`: two boxes side by side over the middle half of the 128-pixel width (pixels 32-64 and 64-96,
    latents 4-7 and 8-11). Views [0, 8), [4, 12), [8, 16) hold 2 prompts each: the background and box 1, both boxes
    (no background left), box 2 and the background."""
    code, report, table = run_main(ARGS + ["--modes", "exact", "--regions", "2", "--no-decode"])
    assert code == 0
    config, rows = report["config"], {row["mode"]: row for row in report["rows"]}
    assert list(rows) == ["multidiffusion", "multidiffusion+regions", "exact", "exact+regions"]
    assert config["region_boxes"] == [[32, 64], [64, 96]] and config["region_covered_fraction"] == 0.5
    assert config["view_prompts"] == [2, 2, 2] and config["region_bootstrap_steps"] == 1
    n, prompts = config["num_views"], 2
    assert all(row["passes_match"] for row in rows.values())
    # MultiDiffusion: one UNet pass per prompt present in each view, both steps
    assert rows["multidiffusion+regions"]["passes"]["unet_fwd"] == 2 * n * prompts
    step = rows["exact+regions"]["passes_sync_step"]
    assert (step["unet_fwd"], step["unet_bwd"]) == (prompts * (2 * n - 1), prompts * (n - 1))
    assert (step["dec_fwd"], step["dec_bwd"], step["lpips_fwd"]) == (n, n - 1, n - 1)  # one loss image per view
    assert rows["exact+regions"]["passes"]["unet_fwd"] == prompts * (2 * n - 1) + prompts * n
    for mode in ("multidiffusion", "exact"):
        plain, regional = rows[mode], rows[mode + "+regions"]
        assert plain["regions"] == 0 and plain["region_ratio"] is None and plain["view_prompts"] is None
        assert regional["regions"] == 2 and regional["view_prompts"] == [2, 2, 2]
        assert regional["region_ratio"] == pytest.approx(regional["seconds"] / plain["seconds"])
        assert regional["cpu_region_ratio"] == pytest.approx(regional["cpu_seconds"] / plain["cpu_seconds"])
        assert regional["passes"]["unet_fwd"] > plain["passes"]["unet_fwd"]
    # unsynchronized steps of a region row are priced at MultiDiffusion's with the regions
    md, md_regions = rows["multidiffusion"], rows["multidiffusion+regions"]
    assert md_regions["projected_ratio"] == pytest.approx(md_regions["plain_step_seconds"] / md["md_step_seconds"])
    exact = rows["exact+regions"]
    assert exact["projected_ratio"] == pytest.approx(
        (45 * md_regions["plain_step_seconds"] + 5 * exact["sync_step_seconds"]) / (50 * md["md_step_seconds"])
    )
    assert "x plain" in table and "Prompts present in each view, background included: [2, 2, 2]" in table
    cost = f"exact+regions x{rows['exact+regions']['region_ratio']:.2f} exact"
    assert "Cost of 2 region prompts" in table and cost in table


def test_region_boxes_and_mode_names():
    assert benchmark.region_boxes(128, 2) == [(32, 64), (64, 96)]
    # 24 latent columns, 12 covered from column 6, shared 4/4/4; the whole width with one box
    assert benchmark.region_boxes(192, 3) == [(48, 80), (80, 112), (112, 144)]
    assert benchmark.region_boxes(192, 1, coverage=1.0) == [(0, 192)]
    # 16 columns, a quarter covered: 4 columns for 3 boxes, 1/1/2
    assert benchmark.region_boxes(128, 3, coverage=0.25) == [(48, 56), (56, 64), (64, 80)]
    with pytest.raises(ValueError, match="fewer than one per region"):
        benchmark.region_boxes(128, 9)
    assert benchmark._with_regions("exact@2+compiled") == "exact@2+regions+compiled"
    assert benchmark._without_regions("exact@2+regions+compiled") == "exact@2+compiled"
    assert benchmark._mode_base("fast@auto+regions+compiled") == "fast"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"regions": -1}, "regions=-1"),
        ({"regions": True}, "regions=True"),
        ({"regions": 2, "region_coverage": 0.0}, "region_coverage=0.0"),
        ({"modes": ["exact+regions"]}, "needs region prompts"),
        ({"regions": 1, "modes": ["panorama-pipeline+regions"]}, "take no region prompts"),
        ({"regions": 1, "offload_text_encoder": True}, "offload_text_encoder"),
    ],
)
def test_region_options_are_checked_before_anything_is_built(kwargs, message, monkeypatch):
    def build_pipeline(*args, **kwargs):
        raise AssertionError("built before the options were checked")

    monkeypatch.setattr(benchmark, "build_pipeline", build_pipeline)
    with pytest.raises(ValueError, match=message):
        benchmark.run_benchmark(**kwargs, progress=None)


def test_region_flags():
    for args in (["--regions", "-1"], ["--regions", "2", "--region-coverage", "1.5"], ["--region-coverage", "0.5"]):
        with pytest.raises(SystemExit):
            benchmark.parse_args(ARGS + args)
    with pytest.raises(SystemExit):
        benchmark.parse_args(ARGS + ["--modes", "exact+regions"])
    args = benchmark.parse_args(ARGS + ["--regions", "2"])
    assert (args.regions, args.region_coverage) == (2, benchmark.DEFAULT_REGION_COVERAGE)
