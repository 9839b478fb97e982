"""Every script in examples/ runs offline on the tiny pipeline (`--tiny`) and writes the PNG it reports.

Parametrized over the folder, so a new example is tested as soon as it exists.
"""

import ast
import importlib.util
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
    assert {"controlnet_panorama", "sdxl_panorama", "region_panorama"} <= {path.stem for path in EXAMPLES}


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
