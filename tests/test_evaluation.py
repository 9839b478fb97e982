"""The `syncdiffusion evaluate` command, offline on random-weight networks: which images of a folder it scores,
with which prompts, its table, JSON, CSV and plot, and its one-line errors before any network loads."""

import json

import numpy as np
import pytest
from PIL import Image

from syncdiffusion_utils import evaluation, metrics
from syncdiffusion_utils.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")

W = 16  # crop size of the toy panoramas: small enough for VGG on CPU, still 1x1 after LPIPS-VGG's four poolings


@pytest.fixture(scope="module")
def networks(lpips_module):
    return metrics.random_networks(lpips_module=lpips_module)


def write_set(folder, count, coherent, seed, height=W, tiles_per_row=4):
    """`count` toy panoramas: the same tile repeated (coherent) or different tiles."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        first = rng.integers(0, 256, (height, W, 3), dtype=np.uint8)
        row = [
            first if coherent else rng.integers(0, 256, (height, W, 3), dtype=np.uint8) for _ in range(tiles_per_row)
        ]
        Image.fromarray(np.concatenate(row, axis=1)).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture
def toy_sets(tmp_path, networks, monkeypatch):
    """Two folders of toy panoramas and a reference folder; `--networks random` returns the module's networks."""
    monkeypatch.setattr(evaluation, "random_networks", lambda *a, **k: networks)
    coherent = write_set(tmp_path / "coherent", 3, True, seed=0)
    mixed = write_set(tmp_path / "mixed", 3, False, seed=1)
    reference = tmp_path / "reference"
    reference.mkdir()
    for i in range(6):
        Image.fromarray(np.random.default_rng(10 + i).integers(0, 256, (W, W, 3), dtype=np.uint8)).save(
            reference / f"{i}.png"
        )
    return tmp_path, coherent, mixed, reference


SMALL = ["--window", str(W), "--stride", str(W), "--networks", "random"]


def test_evaluate_writes_table_json_csv_and_plot(toy_sets, networks, capsys):
    tmp_path, coherent, mixed, reference = toy_sets
    out = tmp_path / "out"
    out.mkdir()
    argv = ["evaluate", str(coherent), str(mixed), "--prompt", "a toy", "--reference", str(reference)]
    argv += SMALL + ["--crops", "2", "--giqa-k", "3", "--labels", "MultiDiffusion,SyncDiffusion"]
    argv += ["--json", str(out / "r.json"), "--csv", str(out / "r.csv"), "--plot", str(out / "r.png")]
    assert main(argv) == 0

    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| set | panoramas | Intra-LPIPS ↓ | Intra-Style-L ↓ | Mean-CLIP-S ↑ | Mean-GIQA ↑")
    assert table[2].startswith("| MultiDiffusion | 3 | 0 ± 0 | 0 ± 0 |") and table[3].startswith(
        "| SyncDiffusion | 3 |"
    )

    results = json.loads((out / "r.json").read_text())
    first, second = results["sets"]
    assert list(first["metrics"]) == ["intra-lpips", "intra-style", "clip", "giqa", "fid", "kid"]
    assert second["metrics"]["intra-lpips"]["mean"] > 0.01 and second["metrics"]["intra-style"]["mean"] > 0
    # The per-panorama numbers are the library's on the same file.
    with Image.open(mixed / "00.png") as image:
        expected = metrics.intra_lpips(image.convert("RGB"), W, W, loss=networks["lpips"])
    assert second["panoramas"][0]["intra-lpips"] == pytest.approx(expected, rel=1e-6)
    assert np.mean([p["clip"] for p in second["panoramas"]]) == pytest.approx(second["metrics"]["clip"]["mean"])

    assert len((out / "r.csv").read_text().strip().splitlines()) == 3
    with Image.open(out / "r.png") as plot:
        assert plot.format == "PNG" and plot.width > 6 * 200 and np.asarray(plot.convert("L")).std() > 10


def test_prompts_come_from_the_index_and_metrics_can_be_chosen(toy_sets, capsys):
    tmp_path, coherent, _, _ = toy_sets
    images = [{"file": f"{i:02d}.png", "prompt": "a toy", "seed": i} for i in range(3)]
    (coherent / "index.json").write_text(json.dumps({"settings": {}, "images": images}))
    assert main(["evaluate", str(coherent), "--metrics", "clip,intra-lpips"] + SMALL) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header == "| set | panoramas | Mean-CLIP-S ↑ | Intra-LPIPS ↓ |"


def write_index(folder, files, prompt="a toy", planned=None):
    images = [{"file": name, "prompt": f"{prompt} {i}", "seed": i} for i, name in enumerate(files)]
    index = {"settings": {}, "images": images, "planned": len(files) if planned is None else planned}
    (folder / "index.json").write_text(json.dumps(index), encoding="utf-8")
    return images


def test_the_index_names_the_images_scored_and_their_prompts(toy_sets, networks, capsys):
    """An image in the folder that the index does not list (another run's, a stray copy) is not scored, and its
    missing prompt does not cost every set its CLIP score."""
    tmp_path, coherent, mixed, _ = toy_sets
    images = write_index(coherent, ["02.png", "00.png"], planned=4)  # 01.png is not in the index
    write_index(mixed, ["00.png", "01.png", "02.png"])
    capsys.readouterr()
    argv = ["evaluate", str(coherent), str(mixed), "--json", str(tmp_path / "r.json")] + SMALL
    assert main(argv) == 0

    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == "| set | panoramas | Intra-LPIPS ↓ | Intra-Style-L ↓ | Mean-CLIP-S ↑ |"
    first, second = json.loads((tmp_path / "r.json").read_text())["sets"]
    assert [p["file"] for p in first["panoramas"]] == ["02.png", "00.png"] and len(second["panoramas"]) == 3
    assert "1 image(s) not in its index.json" in captured.err and "2 of the 4 panoramas" in captured.err
    # Each image scored against its own prompt from the index.
    model = networks["clip"]
    with Image.open(coherent / "02.png") as image:
        pixels = metrics.to_tensor(image.convert("RGB"))
    boxes = metrics.random_crop_boxes(W, 4 * W, W, 1, np.random.default_rng(0))  # the command's --seed 0
    expected = metrics.clip_score(list(metrics.crop(pixels, boxes)), images[0]["prompt"], model=model)
    assert first["panoramas"][0]["clip"] == pytest.approx(expected, rel=1e-6)


def test_a_folder_without_prompts_is_named_in_the_note(toy_sets, capsys):
    tmp_path, coherent, mixed, _ = toy_sets
    write_index(coherent, ["00.png", "01.png", "02.png"])
    assert main(["evaluate", str(coherent), str(mixed)] + SMALL) == 0
    captured = capsys.readouterr()
    assert "Mean-CLIP-S" not in captured.out
    assert f"not computing clip, giqa, fid, kid (no --reference; no --prompt, and no index.json in {mixed})" in (
        captured.err
    )


def test_tall_panoramas_are_scored_on_their_vertical_crops(tmp_path, networks, monkeypatch, capsys):
    """A 4-window-high, 1-window-wide panorama (the demo's "tall" preset): the style loss's resize leaves it as it
    is (its shorter side is the window), so both intra metrics compare its 4 stacked crops."""
    monkeypatch.setattr(evaluation, "random_networks", lambda *a, **k: networks)
    folder = tmp_path / "tall"
    folder.mkdir()
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 256, (4 * W, W, 3), dtype=np.uint8)).save(folder / "0.png")
    argv = ["evaluate", str(folder), "--prompt", "a tower", "--json", str(tmp_path / "r.json")] + SMALL
    assert main(argv) == 0, capsys.readouterr().err
    scores = json.loads((tmp_path / "r.json").read_text())["sets"][0]["panoramas"][0]
    with Image.open(folder / "0.png") as image:
        image = image.convert("RGB")
    assert scores["intra-lpips"] == pytest.approx(metrics.intra_lpips(image, W, W, loss=networks["lpips"]), rel=1e-6)
    assert scores["intra-style"] == pytest.approx(metrics.intra_style_loss(image, W, W, vgg=networks["vgg"]), rel=1e-6)
    assert scores["intra-lpips"] > 0 and scores["intra-style"] > 0


def assert_one_line_error(err, *needles):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("syncdiffusion: error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


@pytest.mark.parametrize(
    "case, needles",
    [
        ("missing folder", ["nowhere", "no such folder"]),
        ("no images", ["empty", "no images"]),
        ("smaller than the window", ["8x8", "--window 16"]),
        ("one crop", ["one 16-pixel crop", "--stride"]),
        ("labels", ["--labels", "2 labels for 1 folders"]),
        ("metric", ["--metrics", "'sharpness'"]),
        ("clip without prompt", ["--metrics clip", "--prompt"]),
        ("fid without reference", ["--metrics fid", "--reference"]),
        ("giqa k", ["--giqa-k 8", "2 reference images"]),
        ("kid subset", ["--kid-subset-size 50", "smallest set"]),
        ("plot extension", ["--plot", ".txt"]),
        ("empty label", ["--labels ''", "empty"]),
        ("empty metric", ["--metrics 'clip,'", "unknown metric ''"]),
        ("negative seed", ["--seed", "-1"]),
        ("empty prompt", ["--prompt ' '", "empty prompt"]),
        ("indexed file missing", ["index.json lists '01.png'", "not there"]),
        ("unreadable index", ["index.json", "not an index"]),
    ],
)
def test_bad_input_is_one_line_before_any_network(tmp_path, monkeypatch, capsys, case, needles):
    def no_networks(*args, **kwargs):
        raise AssertionError("a network was built before the input was checked")

    monkeypatch.setattr(evaluation, "random_networks", no_networks)
    good = write_set(tmp_path / "good", 2, True, seed=0)
    (tmp_path / "empty").mkdir()
    small = tmp_path / "small"
    small.mkdir()
    Image.new("RGB", (8, 8)).save(small / "tiny.png")
    two = write_set(tmp_path / "two", 2, True, seed=1, tiles_per_row=1)
    indexed = write_set(tmp_path / "indexed", 1, True, seed=2)
    write_index(indexed, ["00.png", "01.png"])
    broken = write_set(tmp_path / "broken", 1, True, seed=3)
    (broken / "index.json").write_text('{"images": [{"file": "00.png"}]}')
    argv = {
        "missing folder": [str(tmp_path / "nowhere")],
        "no images": [str(tmp_path / "empty")],
        "smaller than the window": [str(small)],
        "one crop": [str(two)],
        "labels": [str(good), "--labels", "a,b"],
        "metric": [str(good), "--metrics", "intra-lpips,sharpness"],
        "clip without prompt": [str(good), "--metrics", "clip"],
        "fid without reference": [str(good), "--metrics", "fid"],
        "giqa k": [str(good), "--reference", str(two)],
        "kid subset": [str(good), "--reference", str(good), "--kid-subset-size", "50", "--giqa-k", "2"],
        "plot extension": [str(good), "--plot", str(tmp_path / "plot.txt")],
        "empty label": [str(good), "--labels", ""],
        "empty metric": [str(good), "--metrics", "clip,", "--prompt", "a toy"],
        "negative seed": [str(good), "--seed", "-1"],
        "empty prompt": [str(good), "--prompt", " "],
        "indexed file missing": [str(indexed)],
        "unreadable index": [str(broken)],
    }[case]
    assert main(["evaluate"] + argv + SMALL) != 0
    assert_one_line_error(capsys.readouterr().err, *needles)
