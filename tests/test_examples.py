"""Every script in examples/ runs offline on the tiny pipeline (`--tiny`) and writes the PNG it reports.

Parametrized over the folder, so a new example is tested as soon as it exists.
"""

import ast
import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


EXAMPLES_FOLDER = Path(__file__).resolve().parent.parent / "examples"
EXAMPLES = sorted(EXAMPLES_FOLDER.glob("*.py"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 8, [path.name for path in EXAMPLES]
    assert {"controlnet_panorama", "sdxl_panorama", "region_panorama", "outpaint_panorama"} <= {
        path.stem for path in EXAMPLES
    }


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_example_has_a_docstring_and_takes_tiny(example):
    source = example.read_text(encoding="utf-8")
    assert ast.get_docstring(ast.parse(source)), f"{example.name} has no docstring"
    assert "--tiny" in source


def run_example(example, tmp_path, *arguments):
    """Run `example --tiny *arguments` offline in a fresh process; return the paths of the files it reports."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",  # no network, ever
        "HF_MODULES_CACHE": str(tmp_path / "modules"),  # custom pipeline code copied by diffusers
        "OMP_NUM_THREADS": "1",  # tiny models: a second thread only adds contention
    }
    result = subprocess.run(
        [sys.executable, str(example), "--tiny", *arguments],
        cwd=tmp_path,  # anything written off --output lands here, not in the repository
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{example.name} failed:\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr

    written = [
        line[len("wrote ") :].rsplit(" (", 1)[0] for line in result.stdout.splitlines() if line.startswith("wrote ")
    ]
    for path in written:
        path = Path(path) if os.path.isabs(path) else tmp_path / path
        assert path.is_file(), f"{example.name} reported {path} but it does not exist"
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width > 0 and image.height > 0
    return written, result.stdout


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_example_runs_offline(example, tmp_path):
    output = tmp_path / f"{example.stem}.png"
    written, stdout = run_example(example, tmp_path, "--output", str(output))
    assert str(output) in written, stdout


def load_example(name):
    """An example script as a module (examples/ is not a package), to read its constants and mask functions."""
    path = EXAMPLES_FOLDER / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_region_example_changes_its_regions(tmp_path):
    """The region prompts change the panorama inside their masks, several times more than far from them."""
    example = load_example("region_panorama")
    height, width, _ = example.TINY_PANORAMA
    paths = {name: tmp_path / f"{name}.png" for name in ("regions", "background", "sheet")}
    written, stdout = run_example(
        EXAMPLES_FOLDER / "region_panorama.py",
        tmp_path,
        "--output",
        str(paths["regions"]),
        "--background-output",
        str(paths["background"]),
        "--sheet",
        str(paths["sheet"]),
    )
    assert sorted(written) == sorted(str(path) for path in paths.values()), stdout

    images = {}
    for name in ("regions", "background"):
        with Image.open(paths[name]) as image:
            assert image.size == (width, height), name
            images[name] = np.asarray(image.convert("RGB"), dtype=np.float32)
    with Image.open(paths["sheet"]) as sheet:
        assert sheet.width == max(1, example.SHEET_WIDTH // width) * width
    change = np.abs(images["regions"] - images["background"]).mean(-1)

    house = np.asarray(example.house_mask(height, width)) > 127
    box = example.box_mask(height, width) > 0.5
    far = np.zeros_like(house)
    far[:, : width // 10] = True  # the left tenth: 28 pixels or more from the house, 138 from the box
    assert not (far & (house | box)).any()
    # Measured on the tiny model, seed 0: mean change 10.7 in the house, 8.2 in the box, 1.5 in the left tenth
    # (synchronization and the UNet's receptive field carry a little of it everywhere).
    far_change = change[far].mean()
    for name, mask in (("house", house), ("box", box)):
        assert change[mask].mean() > 3 * far_change and change[mask].mean() > 3, (
            name,
            change[mask].mean(),
            far_change,
        )


def test_outpaint_example_keeps_its_photo(tmp_path, monkeypatch):
    """In process, with `tests/test_cli_image.py`'s averaging VAE (the tiny model's random one reconstructs
    nothing): the canvas holds the drawn photo, centred, and the panorama keeps it, to the VAE's reconstruction
    (8x8-pixel block means) and the PNG's rounding, while the rest is generated."""
    from syncdiffusion_utils.outpainting import place_photo
    from tests.test_cli_image import PNG_ROUNDING, averaging_vae, reconstruction

    example = load_example("outpaint_panorama")
    load = example.load_pipeline

    def load_pipeline(*args, **kwargs):
        pipe = load(*args, **kwargs)
        pipe.vae = averaging_vae()
        return pipe

    monkeypatch.setattr(example, "load_pipeline", load_pipeline)
    output, canvas_output = tmp_path / "panorama.png", tmp_path / "canvas.png"
    example.main(["--tiny", "--output", str(output), "--canvas-output", str(canvas_output)])

    height, width, _ = example.TINY_PANORAMA
    photo = example.make_photo(height)
    image, mask = place_photo(photo, height, width, "center")
    with Image.open(canvas_output) as canvas:
        np.testing.assert_array_equal(np.asarray(canvas), np.asarray(image))
    left = (width - photo.width) // 2
    np.testing.assert_array_equal(np.asarray(image)[:, left : left + photo.width], np.asarray(photo))
    with Image.open(output) as panorama:
        assert panorama.size == (width, height)
        result = np.asarray(panorama.convert("RGB"), dtype=np.float64)
    kept = np.asarray(mask) == 0
    rebuilt = reconstruction(averaging_vae(), image)
    assert np.abs(result - rebuilt)[kept].max() <= PNG_ROUNDING
    # the generated rest is far from the canvas's stretched edges
    canvas_error = np.abs(result - np.asarray(image, dtype=np.float64))
    assert canvas_error[~kept].mean() > 5 * canvas_error[kept].mean(), (
        canvas_error[~kept].mean(),
        canvas_error[kept].mean(),
    )


# The FLUX.2 [klein] and Z-Image examples: the real models' panoramas, checked against the pipelines' own geometry
# and the diffusers pipelines' defaults (no weights: tiny pipelines of the same window, 1024 pixels).


def assert_thirteen_views_256_pixels_apart(pipe, call):
    """The docstrings' panorama: one row of 13 views of 1024 pixels (128 latents), 256 pixels (32 latents) apart."""
    views = pipe.get_views(call["height"], call["width"], call.get("window_size"), call.get("stride"))
    assert [view[2] for view in views] == list(range(0, 32 * 13, 32)), views
    assert all(view[:2] == (0, 128) and view[3] - view[2] == 128 for view in views), views


@pytest.mark.parametrize("is_distilled", [True, False], ids=["klein-4B", "klein-base-4B"])
def test_flux2_klein_example_takes_the_models_own_settings(is_distilled):
    """Step-distilled: 4 steps and no guidance (a scale above 1 would only warn that it is ignored); a base model:
    Flux2KleinPipeline's steps and classifier-free guidance. `--fast` changes the synchronization only."""
    from diffusers import Flux2KleinPipeline

    from pipeline_syncdiffusion_flux2 import SyncDiffusionFlux2KleinPipeline
    from syncdiffusion_utils.testing import tiny_flux2_klein_pipeline

    example = load_example("flux2_klein_panorama")
    pipe = tiny_flux2_klein_pipeline(
        pipeline_class=SyncDiffusionFlux2KleinPipeline, lpips_module=False, is_distilled=is_distilled
    )
    call = example.panorama_call(pipe, example.make_parser().parse_args([]))
    assert pipe.default_window_size == 1024 and call["view_batch_size"] == "auto"
    assert_thirteen_views_256_pixels_apart(pipe, call)
    defaults = inspect.signature(Flux2KleinPipeline.__call__).parameters
    if is_distilled:
        assert call["num_inference_steps"] == 4 and call["guidance_scale"] <= 1
    else:
        assert call["num_inference_steps"] == defaults["num_inference_steps"].default == 50
        assert call["guidance_scale"] == defaults["guidance_scale"].default > 1
    assert 0 < call["sync_thres"] <= call["num_inference_steps"] // 2
    fast = example.panorama_call(pipe, example.make_parser().parse_args(["--fast"]))
    assert fast == {**call, "sync_mode": "fast"}


def test_z_image_example_takes_turbos_settings_or_z_image_pipelines():
    """Z-Image-Turbo's 8 steps without guidance by default; `--steps 50 --guidance-scale 5` are ZImagePipeline's
    defaults. Steps and guidance out of range are argparse errors."""
    from diffusers import ZImagePipeline

    from pipeline_syncdiffusion_z_image import SyncDiffusionZImagePipeline
    from syncdiffusion_utils.testing import tiny_z_image_pipeline

    example = load_example("z_image_panorama")
    parser = example.make_parser()
    pipe = tiny_z_image_pipeline(pipeline_class=SyncDiffusionZImagePipeline, lpips_module=False)
    turbo = example.panorama_call(parser.parse_args([]))
    assert pipe.default_window_size == 1024 and turbo["view_batch_size"] == "auto"
    assert_thirteen_views_256_pixels_apart(pipe, turbo)
    assert (turbo["num_inference_steps"], turbo["guidance_scale"], turbo["sync_thres"]) == (8, 0.0, 4)
    base = example.panorama_call(parser.parse_args(["--steps", "50", "--guidance-scale", "5"]))
    defaults = inspect.signature(ZImagePipeline.__call__).parameters
    assert (base["num_inference_steps"], base["guidance_scale"]) == (
        defaults["num_inference_steps"].default,
        defaults["guidance_scale"].default,
    )
    assert base["sync_thres"] == 5  # the paper's 5 synchronized steps
    assert example.panorama_call(parser.parse_args(["--fast"])) == {**turbo, "sync_mode": "fast"}
    for bad in (["--steps", "0"], ["--guidance-scale", "-1"], ["--steps", "two"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
