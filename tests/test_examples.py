"""Every script in examples/ runs offline on the tiny pipeline (`--tiny`) and writes the PNG it reports.

Parametrized over the folder, so a new example is tested as soon as it exists.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image


EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 8, [path.name for path in EXAMPLES]
    assert {"controlnet_panorama", "sdxl_panorama"} <= {path.stem for path in EXAMPLES}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_example_has_a_docstring_and_takes_tiny(example):
    source = example.read_text(encoding="utf-8")
    assert ast.get_docstring(ast.parse(source)), f"{example.name} has no docstring"
    assert "--tiny" in source


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_example_runs_offline(example, tmp_path):
    output = tmp_path / f"{example.stem}.png"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",  # no network, ever
        "HF_MODULES_CACHE": str(tmp_path / "modules"),  # custom pipeline code copied by diffusers
        "OMP_NUM_THREADS": "1",  # tiny models: a second thread only adds contention
    }
    result = subprocess.run(
        [sys.executable, str(example), "--tiny", "--output", str(output)],
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
    assert str(output) in written, result.stdout
    for path in written:
        path = Path(path) if os.path.isabs(path) else tmp_path / path
        assert path.is_file(), f"{example.name} reported {path} but it does not exist"
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width > 0 and image.height > 0
