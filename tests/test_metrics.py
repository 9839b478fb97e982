"""The evaluation metrics, offline on random-weight networks.

Each metric is compared with a reference computed another way: the authors' per-pair loops (eval_intra_lpips.py,
eval_style_loss.py), CLIP's own forward pass, FID's closed form with scipy, and GIQA's official per-image loop.
"""

import itertools
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from syncdiffusion_utils import metrics


pytestmark = pytest.mark.usefixtures("one_thread")

W = 16  # crop size of the toy panoramas: small enough for VGG on CPU, still 1x1 after LPIPS-VGG's four poolings


@pytest.fixture(scope="module")
def networks(lpips_module):
    return metrics.random_networks(lpips_module=lpips_module)


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
    boxes = metrics.crop_boxes(height, width, window, stride)
    assert boxes == authors_views(height, width, window, stride)
    assert len(boxes) == crops
    if (height, width, stride) == (512, 3072, 512):
        assert len(list(itertools.combinations(boxes, 2))) == 15


def test_random_crops_are_seeded_and_reach_every_edge():
    draw = lambda: metrics.random_crop_boxes(20, 40, 16, 400, np.random.default_rng(3))  # noqa: E731
    boxes = draw()
    assert boxes == draw()
    assert all(0 <= t and b <= 20 and 0 <= left and r <= 40 and b - t == r - left == 16 for t, b, left, r in boxes)
    assert {t for t, *_ in boxes} == set(range(5)) and {box[2] for box in boxes} == set(range(25))


def test_bad_geometry_is_a_value_error_naming_the_argument():
    with pytest.raises(ValueError, match="window"):
        metrics.crop_boxes(256, 1024, 512, 512)
    with pytest.raises(ValueError, match="stride"):
        metrics.crop_boxes(512, 1024, 512, 0)


# ----------------------------------------------------------------------------------------------------------------
# Coherence
# ----------------------------------------------------------------------------------------------------------------


def test_intra_lpips_is_the_authors_mean_over_pairs(networks):
    loss = networks["lpips"]
    uniform = tiles(*[tile(0)] * 4)
    halves = tiles(tile(0), tile(0), tile(1), tile(1))
    assert metrics.intra_lpips(uniform, W, W, loss=loss) == 0.0

    # The authors' loop: one pair at a time, [-1, 1], mean over the 2-combinations.
    crops = [halves[:, :, i * W : (i + 1) * W] * 2 - 1 for i in range(4)]
    with torch.no_grad():
        expected = np.mean(
            [loss(crops[i][None], crops[j][None]).item() for i, j in itertools.combinations(range(4), 2)]
        )
    score = metrics.intra_lpips(halves, W, W, loss=loss, batch_size=4)
    assert score > 0.01
    assert score == pytest.approx(expected, rel=1e-5)  # batched against one-by-one convolutions: float32 rounding
    # Several panoramas: the mean of their scores; a PIL image gives the tensor's score.
    assert metrics.intra_lpips([uniform, halves], W, W, loss=loss) == pytest.approx(score / 2, rel=1e-5)
    pil = Image.fromarray((halves.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    assert metrics.intra_lpips(pil, W, W, loss=loss) == pytest.approx(score, rel=1e-2)  # 8-bit quantization


def authors_style_pair(vgg, target, crop):
    """eval_style_loss.py for one pair: StyleLoss modules with `target`'s Gram matrices after conv_1..conv_5 of a
    copy of `vgg` with out-of-place ReLUs, `crop` run through it, the five losses added."""
    mean = torch.tensor(metrics.IMAGENET_MEAN).view(-1, 1, 1)
    std = torch.tensor(metrics.IMAGENET_STD).view(-1, 1, 1)

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
    assert metrics.intra_style_loss(tiles(a, a, a), W, W, vgg=vgg) == 0.0

    with torch.no_grad():
        pair = authors_style_pair(vgg, a, b)
    one_pair = metrics.intra_style_loss(tiles(a, b), W, W, vgg=vgg)
    assert one_pair > 0
    assert one_pair == pytest.approx(pair, rel=1e-4)  # batched float32 convolutions against one-by-one
    # Summed, not averaged, over pairs: (a, b), (a, b), (b, b) is twice one pair (a mean would be 2/3 of it).
    assert metrics.intra_style_loss(tiles(a, b, b), W, W, vgg=vgg) == pytest.approx(2 * pair, rel=1e-4)


def test_intra_style_loss_resizes_the_shorter_side_to_the_window(networks):
    vgg = networks["vgg"]
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (2 * W, 8 * W, 3), dtype=np.uint8))
    small = big.resize((4 * W, W), Image.BILINEAR)  # what the authors' T.Resize(512) does to a PIL image
    assert metrics.intra_style_loss(big, W, W, vgg=vgg) == pytest.approx(
        metrics.intra_style_loss(small, W, W, vgg=vgg), rel=1e-6
    )


# ----------------------------------------------------------------------------------------------------------------
# Prompt fidelity and quality
# ----------------------------------------------------------------------------------------------------------------


def test_clip_score_is_clips_own_cosine(networks):
    model, processor = networks["clip"]
    images = [tile(i) for i in range(3)]
    prompts = ["a red house", "a blue lake", "a green field"]
    score = metrics.clip_score(images, prompts, model=(model, processor))

    # CLIP's forward pass: logits_per_image = exp(logit_scale) * cos, for every image-text pair; the diagonal.
    inputs = processor(text=prompts, images=[metrics.to_uint8(i) for i in images], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image.diagonal() / model.logit_scale.exp()
    expected = (100 * logits).clamp(min=0).mean().item()
    assert score == pytest.approx(expected, rel=1e-4, abs=1e-4)  # float32 (cosine against normalized dot product)
    assert metrics.clip_score(images, "a red house", model=(model, processor)) == pytest.approx(
        metrics.clip_score(images, ["a red house"] * 3, model=(model, processor))
    )
    with pytest.raises(ValueError, match="prompts"):
        metrics.clip_score(images, ["one", "two"], model=(model, processor))


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

    same = metrics.fid_kid(images, images, features=features)
    assert abs(same["fid"]) < 1e-6  # float64 on 16-dimensional features
    assert abs(same["kid"]) < 1e-3  # KID's unbiased estimate scatters around 0 for equal sets

    other = metrics.fid_kid(darker, images, features=features)
    x = metrics.image_features(darker, features).numpy()
    y = metrics.image_features(images, features).numpy()
    assert other["fid"] == pytest.approx(frechet_distance(x, y), rel=1e-4)  # two matrix square-root methods
    assert other["fid"] > 1000 * abs(same["fid"]) and other["kid"] > 10 * abs(same["kid"])


def test_kid_subset_larger_than_a_set_is_a_clear_error(networks):
    images = [tile(i) for i in range(5)]
    with pytest.raises(ValueError, match="subset_size.* 5 images"):
        metrics.fid_kid(images, images + images, features=networks["features"], subset_size=8)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.fid_kid(images[:1], images, features=networks["features"])


def test_giqa_is_the_official_knn_score(networks):
    features = networks["features"]
    images, reference = [tile(i) for i in range(4)], [tile(50 + i) for i in range(12)]
    score = metrics.giqa(images, reference, k=3, features=features)

    # knn_score.py: L1 pairwise_distance to every reference feature, sorted, sum of 1/d over the K nearest.
    act = metrics.image_features(reference, features)
    expected = []
    for pred in metrics.image_features(images, features):
        distances = sorted(F.pairwise_distance(pred[None].repeat(len(act), 1), act, p=1).tolist())
        expected.append(sum(1 / d for d in distances[:3]))
    assert score == pytest.approx(np.mean(expected), rel=1e-9)  # float64 both ways
    with pytest.raises(ValueError, match="`k`"):
        metrics.giqa(images, reference, k=13, features=features)


def test_missing_weights_are_one_line_saying_how_to_provide_them(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(metrics.WeightsUnavailable) as error:
        metrics.load_vgg19.__wrapped__()
    message = str(error.value)
    assert "\n" not in message and "vgg19-dcbb9e9d.pth" in message and "TORCH_HOME" in message


@pytest.mark.parametrize(
    "height, width", [(W, 4 * W), (4 * W, W), (2 * W, 8 * W), (22, 31), (31, 22), (17, W), (W, W)]
)
def test_style_size_is_torchvisions_shorter_side_resize(height, width):
    from torchvision.transforms.functional import resize

    size = metrics.style_size(height, width, W)
    assert min(size) == W
    assert tuple(resize(torch.zeros(3, height, width), W, antialias=True).shape[-2:]) == size
    assert resize(Image.new("RGB", (width, height)), W).size[::-1] == size


def test_tall_panoramas_compare_their_stacked_crops(networks):
    """A panorama one window wide: both intra metrics compare its crops one above the other (the style loss's
    resize leaves it as it is), the authors' loops on those crops."""
    crops = [tile(i) for i in range(3)]
    tall = torch.cat(crops, dim=1)
    for metric in ("intra-lpips", "intra-style"):
        assert metrics.intra_crop_boxes(3 * W, W, W, W, metric) == [
            (0, W, 0, W),
            (W, 2 * W, 0, W),
            (2 * W, 3 * W, 0, W),
        ]
    with torch.no_grad():
        pair_losses = [
            authors_style_pair(networks["vgg"], crops[i], crops[j]) for i, j in itertools.combinations(range(3), 2)
        ]
        lpips = [
            networks["lpips"](crops[i][None] * 2 - 1, crops[j][None] * 2 - 1).item()
            for i, j in itertools.combinations(range(3), 2)
        ]
    assert metrics.intra_style_loss(tall, W, W, vgg=networks["vgg"]) == pytest.approx(sum(pair_losses), rel=1e-4)
    assert metrics.intra_lpips(tall, W, W, loss=networks["lpips"]) == pytest.approx(np.mean(lpips), rel=1e-5)
    # One crop, at full size or after the style loss's resize: no pair, a clear error naming both sizes.
    with pytest.raises(ValueError, match="32x16 panorama .resized to 16x8. has one 8-pixel crop"):
        metrics.intra_crop_boxes(16, 32, 8, 16, "intra-style")
    with pytest.raises(ValueError, match="16x16 panorama has one 16-pixel crop"):
        metrics.intra_lpips(tile(0), W, W, loss=networks["lpips"])
