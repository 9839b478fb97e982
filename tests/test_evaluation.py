"""Evaluation metrics and the `syncdiffusion evaluate` command, offline on random-weight networks.

Each metric is compared with a reference computed another way: the authors' per-pair loops (eval_intra_lpips.py,
eval_style_loss.py), CLIP's own forward pass, FID's closed form with scipy, and GIQA's official per-image loop.
"""

import itertools
import json
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from syncdiffusion_utils import evaluation
from syncdiffusion_utils.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")

W = 16  # crop size of the toy panoramas: small enough for VGG on CPU, still 1x1 after LPIPS-VGG's four poolings


@pytest.fixture(scope="module")
def networks(lpips_module):
    return evaluation.random_networks(lpips_module=lpips_module)


def tiles(*images):
    """A panorama of `W`-pixel tiles side by side."""
    return torch.cat(images, dim=2)


def tile(seed):
    return torch.rand(3, W, W, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# Crops
# ----------------------------------------------------------------------------------------------------------------


def authors_views(height, width, window, stride):
    """get_views_crop of the authors' eval scripts, as they wrote it (index arithmetic over the block count)."""
    rows, columns = (height - window) // stride + 1, (width - window) // stride + 1
    views = []
    for i in range(rows * columns):
        top, left = (i // columns) * stride, (i % columns) * stride
        views.append((top, top + window, left, left + window))
    return views


@pytest.mark.parametrize(
    "height, width, window, stride, crops",
    [
        (512, 3072, 512, 512, 6),
        (512, 2048, 512, 256, 7),
        (512, 3017, 512, 512, 5),
        (1024, 2048, 512, 512, 8),
        (512, 512, 512, 512, 1),
        (64, 200, 32, 24, 16),
    ],
)
def test_crop_layout_is_the_authors(height, width, window, stride, crops):
    boxes = evaluation.crop_boxes(height, width, window, stride)
    assert boxes == authors_views(height, width, window, stride)
    assert len(boxes) == crops
    if (height, width, stride) == (512, 3072, 512):
        assert len(list(itertools.combinations(boxes, 2))) == 15


def test_random_crops_are_seeded_and_reach_every_edge():
    draw = lambda: evaluation.random_crop_boxes(20, 40, 16, 400, np.random.default_rng(3))  # noqa: E731
    boxes = draw()
    assert boxes == draw()
    assert all(0 <= t and b <= 20 and 0 <= left and r <= 40 and b - t == r - left == 16 for t, b, left, r in boxes)
    assert {t for t, *_ in boxes} == set(range(5)) and {box[2] for box in boxes} == set(range(25))


def test_bad_geometry_is_a_value_error_naming_the_argument():
    with pytest.raises(ValueError, match="window"):
        evaluation.crop_boxes(256, 1024, 512, 512)
    with pytest.raises(ValueError, match="stride"):
        evaluation.crop_boxes(512, 1024, 512, 0)


# ----------------------------------------------------------------------------------------------------------------
# Coherence
# ----------------------------------------------------------------------------------------------------------------


def test_intra_lpips_is_the_authors_mean_over_pairs(networks):
    loss = networks["lpips"]
    uniform = tiles(*[tile(0)] * 4)
    halves = tiles(tile(0), tile(0), tile(1), tile(1))
    assert evaluation.intra_lpips(uniform, W, W, loss=loss) == 0.0

    # The authors' loop: one pair at a time, [-1, 1], mean over the 2-combinations.
    crops = [halves[:, :, i * W : (i + 1) * W] * 2 - 1 for i in range(4)]
    with torch.no_grad():
        expected = np.mean(
            [loss(crops[i][None], crops[j][None]).item() for i, j in itertools.combinations(range(4), 2)]
        )
    score = evaluation.intra_lpips(halves, W, W, loss=loss, batch_size=4)
    assert score > 0.01
    assert score == pytest.approx(expected, rel=1e-5)  # batched against one-by-one convolutions: float32 rounding
    # Several panoramas: the mean of their scores; a PIL image gives the tensor's score.
    assert evaluation.intra_lpips([uniform, halves], W, W, loss=loss) == pytest.approx(score / 2, rel=1e-5)
    pil = Image.fromarray((halves.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    assert evaluation.intra_lpips(pil, W, W, loss=loss) == pytest.approx(score, rel=1e-2)  # 8-bit quantization


def authors_style_pair(vgg, target, crop):
    """eval_style_loss.py for one pair: StyleLoss modules with `target`'s Gram matrices after conv_1..conv_5 of a
    copy of `vgg` with out-of-place ReLUs, `crop` run through it, the five losses added."""
    mean = torch.tensor(evaluation.IMAGENET_MEAN).view(-1, 1, 1)
    std = torch.tensor(evaluation.IMAGENET_STD).view(-1, 1, 1)

    def gram(x):
        a, b, c, d = x.size()
        features = x.view(a * b, c * d)
        return torch.mm(features, features.t()).div(a * b * c * d)

    x, y, total, convs = (target[None] - mean) / std, (crop[None] - mean) / std, 0.0, 0
    for layer in vgg.children():
        layer = torch.nn.ReLU(inplace=False) if isinstance(layer, torch.nn.ReLU) else layer
        x, y = layer(x), layer(y)
        if isinstance(layer, torch.nn.Conv2d):
            convs += 1
            total += F.mse_loss(gram(y), gram(x)).item()
            if convs == 5:
                return total


def test_intra_style_loss_sums_the_authors_pair_losses(networks):
    vgg = networks["vgg"]
    a, b = tile(0), tile(1)
    assert evaluation.intra_style_loss(tiles(a, a, a), W, W, vgg=vgg) == 0.0

    with torch.no_grad():
        pair = authors_style_pair(vgg, a, b)
    one_pair = evaluation.intra_style_loss(tiles(a, b), W, W, vgg=vgg)
    assert one_pair > 0
    assert one_pair == pytest.approx(pair, rel=1e-4)  # batched float32 convolutions against one-by-one
    # Summed, not averaged, over pairs: (a, b), (a, b), (b, b) is twice one pair (a mean would be 2/3 of it).
    assert evaluation.intra_style_loss(tiles(a, b, b), W, W, vgg=vgg) == pytest.approx(2 * pair, rel=1e-4)


def test_intra_style_loss_resizes_the_shorter_side_to_the_window(networks):
    vgg = networks["vgg"]
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (2 * W, 8 * W, 3), dtype=np.uint8))
    small = big.resize((4 * W, W), Image.BILINEAR)  # what the authors' T.Resize(512) does to a PIL image
    assert evaluation.intra_style_loss(big, W, W, vgg=vgg) == pytest.approx(
        evaluation.intra_style_loss(small, W, W, vgg=vgg), rel=1e-6
    )


# ----------------------------------------------------------------------------------------------------------------
# Prompt fidelity and quality
# ----------------------------------------------------------------------------------------------------------------


def test_clip_score_is_clips_own_cosine(networks):
    model, processor = networks["clip"]
    images = [tile(i) for i in range(3)]
    prompts = ["a red house", "a blue lake", "a green field"]
    score = evaluation.clip_score(images, prompts, model=(model, processor))

    # CLIP's forward pass: logits_per_image = exp(logit_scale) * cos, for every image-text pair; the diagonal.
    inputs = processor(
        text=prompts, images=[evaluation.to_uint8(i) for i in images], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        logits = model(**inputs).logits_per_image.diagonal() / model.logit_scale.exp()
    expected = (100 * logits).clamp(min=0).mean().item()
    assert score == pytest.approx(expected, rel=1e-4, abs=1e-4)  # float32 (cosine against normalized dot product)
    assert evaluation.clip_score(images, "a red house", model=(model, processor)) == pytest.approx(
        evaluation.clip_score(images, ["a red house"] * 3, model=(model, processor))
    )
    with pytest.raises(ValueError, match="prompts"):
        evaluation.clip_score(images, ["one", "two"], model=(model, processor))


def frechet_distance(x, y):
    """FID's closed form: |mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x S_y)^(1/2)), with scipy's matrix square root."""
    from scipy import linalg

    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = linalg.sqrtm(s_x @ s_y).real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(s_x + s_y - 2 * root))


def test_fid_kid_of_a_set_against_itself_is_zero_and_matches_the_closed_form(networks):
    features = networks["features"]
    images = [tile(i) for i in range(40)]
    darker = [tile(100 + i) * 0.6 for i in range(40)]

    same = evaluation.fid_kid(images, images, features=features)
    assert abs(same["fid"]) < 1e-6  # float64 on 16-dimensional features
    assert abs(same["kid"]) < 1e-3  # KID's unbiased estimate scatters around 0 for equal sets

    other = evaluation.fid_kid(darker, images, features=features)
    x = evaluation.image_features(darker, features).numpy()
    y = evaluation.image_features(images, features).numpy()
    assert other["fid"] == pytest.approx(frechet_distance(x, y), rel=1e-4)  # two matrix square-root methods
    assert other["fid"] > 1000 * abs(same["fid"]) and other["kid"] > 10 * abs(same["kid"])


def test_kid_subset_larger_than_a_set_is_a_clear_error(networks):
    images = [tile(i) for i in range(5)]
    with pytest.raises(ValueError, match="subset_size.* 5 images"):
        evaluation.fid_kid(images, images + images, features=networks["features"], subset_size=8)
    with pytest.raises(ValueError, match="at least 2"):
        evaluation.fid_kid(images[:1], images, features=networks["features"])


def test_giqa_is_the_official_knn_score(networks):
    features = networks["features"]
    images, reference = [tile(i) for i in range(4)], [tile(50 + i) for i in range(12)]
    score = evaluation.giqa(images, reference, k=3, features=features)

    # knn_score.py: L1 pairwise_distance to every reference feature, sorted, sum of 1/d over the K nearest.
    act = evaluation.image_features(reference, features)
    expected = []
    for pred in evaluation.image_features(images, features):
        distances = sorted(F.pairwise_distance(pred[None].repeat(len(act), 1), act, p=1).tolist())
        expected.append(sum(1 / d for d in distances[:3]))
    assert score == pytest.approx(np.mean(expected), rel=1e-9)  # float64 both ways
    with pytest.raises(ValueError, match="`k`"):
        evaluation.giqa(images, reference, k=13, features=features)


def test_missing_weights_are_one_line_saying_how_to_provide_them(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(evaluation.WeightsUnavailable) as error:
        evaluation.load_vgg19.__wrapped__()
    message = str(error.value)
    assert "\n" not in message and "vgg19-dcbb9e9d.pth" in message and "TORCH_HOME" in message


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------


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


def test_evaluate_writes_table_json_csv_and_plot(toy_sets, capsys):
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
        expected = evaluation.intra_lpips(image.convert("RGB"), W, W, loss=evaluation.random_networks()["lpips"])
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
    }[case]
    assert main(["evaluate"] + argv + SMALL) != 0
    assert_one_line_error(capsys.readouterr().err, *needles)
