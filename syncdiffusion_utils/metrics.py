"""SyncDiffusion's evaluation metrics as functions on images: coherence (intra-LPIPS, intra-style loss), prompt
fidelity (CLIP score) and image quality (FID, KID, Mean-GIQA), with the crops they are measured on and the networks
they use. `syncdiffusion evaluate` (`syncdiffusion_utils.evaluation`) runs them over folders of panoramas.

The protocol is the authors' (SyncDiffusion, NeurIPS 2023, `eval_code/` of
github.com/KAIST-Visual-AI-Group/SyncDiffusion):

- coherence is measured on the panorama's `window`-sized crops taken every `stride` pixels, row-major from the
  top-left (`crop_boxes`), over all pairs of crops;
- prompt fidelity and quality are measured on random `window`-sized crops of each panorama (`random_crop_boxes`),
  FID, KID and GIQA against single images of the base model at window size.

Images are PIL images or float tensors `(3, H, W)` in [0, 1]. Every metric takes its network as an argument; left
out, the pretrained one is loaded (and downloaded once) on first use. Lower intra-LPIPS, intra-style loss, FID and
KID are better; higher CLIP score and GIQA are better.

torch, torchvision and torchmetrics are imported inside the functions, so importing this module is instant.
`pip install "syncdiffusion[eval]"` installs what the metrics need beyond the pipeline.
"""

import contextlib
import functools
import itertools
import os
import sys
import warnings


DEFAULT_WINDOW = 512  # the authors' crop size: Stable Diffusion 2 base's image size
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch16"  # the authors'
STYLE_LAYERS = 5  # conv_1 .. conv_5 of VGG-19, as in the authors' eval_style_loss.py
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailable(RuntimeError):
    """A pretrained network's weights are not in the cache and cannot be downloaded; the message says how to
    provide them."""


# ----------------------------------------------------------------------------------------------------------------
# Images and crops
# ----------------------------------------------------------------------------------------------------------------


def crop_boxes(height, width, window=DEFAULT_WINDOW, stride=DEFAULT_WINDOW):
    """The authors' crop layout (`get_views_crop`): `(top, bottom, left, right)` of `window`-sized crops every
    `stride` pixels, row-major from the top-left; `(W - window) // stride + 1` per row, likewise per column.

    512x3072 at stride 512 gives 6 crops; 512x2048 at stride 256 gives 7. Pixels past the last full stride are not
    covered, as in the authors' code.
    """
    _check_geometry(height, width, window, stride)
    rows = (height - window) // stride + 1
    columns = (width - window) // stride + 1
    return [
        (r * stride, r * stride + window, c * stride, c * stride + window) for r in range(rows) for c in range(columns)
    ]


def random_crop_boxes(height, width, window=DEFAULT_WINDOW, count=1, generator=None):
    """`count` random `window`-sized crops, `(top, bottom, left, right)`, uniform over every position.

    The authors' `crop_panorama.py` draws one crop per 512-pixel-high panorama with `np.random.randint(0, W - 512)`,
    which never picks the rightmost position; here every position can be drawn, also vertically for taller images.
    `generator` is a `numpy.random.Generator` (default: a fresh unseeded one).
    """
    import numpy as np

    _check_geometry(height, width, window, window)
    if count < 1:
        raise ValueError(f"`count` must be a positive integer, got {count}.")
    generator = generator if generator is not None else np.random.default_rng()
    tops = generator.integers(0, height - window + 1, size=count)
    lefts = generator.integers(0, width - window + 1, size=count)
    return [(int(top), int(top) + window, int(left), int(left) + window) for top, left in zip(tops, lefts)]


def style_size(height, width, window=DEFAULT_WINDOW):
    """`(height, width)` of a panorama after the intra-style loss's resize: the shorter side to `window`, the longer
    one scaled and truncated, as torchvision's `resize(image, window)` (the authors' `T.Resize(512)`) does; a
    2048x512 (tall) panorama stays 2048x512, a 1024x4096 one becomes 512x2048."""
    if height <= width:
        return window, int(window * width / height)
    return int(window * height / width), window


def intra_crop_boxes(height, width, window=DEFAULT_WINDOW, stride=DEFAULT_WINDOW, metric="intra-lpips"):
    """The crops `metric` ("intra-lpips" or "intra-style") compares in a `height x width` panorama: `crop_boxes` at
    full resolution for intra-LPIPS, of the `style_size` resize for the intra-style loss. Raises a `ValueError` when
    there are fewer than two (no pair to compare)."""
    if metric not in ("intra-lpips", "intra-style"):
        raise ValueError(f"`metric` must be 'intra-lpips' or 'intra-style', got {metric!r}.")
    size = style_size(height, width, window) if metric == "intra-style" else (height, width)
    boxes = crop_boxes(*size, window, stride)
    if len(boxes) < 2:
        resized = f" (resized to {size[1]}x{size[0]})" if size != (height, width) else ""
        raise ValueError(
            f"a {width}x{height} panorama{resized} has one {window}-pixel crop at stride {stride}: {metric} compares"
            " pairs of crops."
        )
    return boxes


def _check_geometry(height, width, window, stride):
    if not (isinstance(window, int) and window > 0):
        raise ValueError(f"`window` must be a positive integer, got {window!r}.")
    if not (isinstance(stride, int) and stride > 0):
        raise ValueError(f"`stride` must be a positive integer, got {stride!r}.")
    if height < window or width < window:
        raise ValueError(f"a {width}x{height} image is smaller than the {window}-pixel `window`.")


def to_tensor(image):
    """A float `(3, H, W)` tensor in [0, 1] from a PIL image or a `(3, H, W)` / `(1, 3, H, W)` tensor."""
    import torch

    if isinstance(image, torch.Tensor):
        if image.dim() == 4 and image.shape[0] == 1:
            image = image[0]
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image tensor of shape (3, H, W), got {tuple(image.shape)}.")
        if image.dtype == torch.uint8:
            return image.float() / 255
        return image.float()
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(image.convert("RGB")).float() / 255


def to_uint8(image):
    """A `uint8` `(3, H, W)` tensor from a PIL image or a [0, 1] tensor (what CLIP's processor and Inception take)."""
    import torch

    if isinstance(image, torch.Tensor):
        if image.dtype == torch.uint8:
            return image[0] if image.dim() == 4 and image.shape[0] == 1 else image
        return to_tensor(image).clamp(0, 1).mul(255).round().to(torch.uint8)
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(image.convert("RGB"))


def _image_list(images):
    """One image, a list of images, or an `(N, 3, H, W)` tensor, as a list."""
    import torch

    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return list(images)
    return [images]


def _size(image):
    """`(height, width)` of a PIL image or an image tensor."""
    if hasattr(image, "size") and not callable(image.size):
        return image.size[1], image.size[0]
    return tuple(image.shape[-2:])


def crop(image, boxes):
    """The crops `boxes` of one image as a `(len(boxes), 3, window, window)` tensor in [0, 1]."""
    import torch

    pixels = to_tensor(image)
    return torch.stack([pixels[:, top:bottom, left:right] for top, bottom, left, right in boxes])


def _device_of(module):
    parameter = next(iter(module.parameters()), None)
    return parameter.device if parameter is not None else "cpu"


# ----------------------------------------------------------------------------------------------------------------
# Coherence
# ----------------------------------------------------------------------------------------------------------------


def intra_lpips(panorama, window=DEFAULT_WINDOW, stride=DEFAULT_WINDOW, loss=None, batch_size=4):
    """Intra-LPIPS: the mean LPIPS distance over all pairs of a panorama's crops (lower = more coherent).

    The authors' `eval_intra_lpips.py`: `window`-sized crops every `stride` pixels (`crop_boxes`), scaled to
    [-1, 1] at full resolution, LPIPS-VGG of every 2-combination, averaged over the pairs; for several panoramas
    (a list or an `(N, 3, H, W)` tensor) the mean of their scores. `loss` is an LPIPS-like module
    `loss(a, b) -> distance per pair` on [-1, 1] images (default `lpips.LPIPS(net="vgg")`); `batch_size` pairs are
    compared at once.
    """
    import torch

    loss = loss if loss is not None else load_lpips()
    device = _device_of(loss)
    scores = []
    for image in _image_list(panorama):
        crops = crop(image, intra_crop_boxes(*_size(image), window, stride, "intra-lpips")).to(device) * 2 - 1
        pairs = list(itertools.combinations(range(len(crops)), 2))
        distances = []
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                first, second = zip(*pairs[start : start + batch_size])
                distances.append(loss(crops[list(first)], crops[list(second)]).reshape(-1).float().cpu())
        scores.append(torch.cat(distances).mean().item())
    return sum(scores) / len(scores)


def gram_matrix(features):
    """`F F^T / (b*c*h*w)` of `(b, c, h, w)` features, flattened to `(b*c, h*w)` (the PyTorch style-transfer
    tutorial's normalization, which the authors use)."""
    b, c, h, w = features.shape
    flat = features.reshape(b * c, h * w)
    return flat @ flat.T / (b * c * h * w)


def style_grams(crops, vgg, layers=STYLE_LAYERS):
    """Gram matrices of the outputs of VGG's first `layers` convolutions (before their ReLU) for each crop.

    `crops` are `(N, 3, h, w)` in [0, 1], ImageNet-normalized here; ReLUs run out of place, so a module built with
    `inplace=True` (torchvision's) does not overwrite the convolution outputs. Returns one list of `layers` Gram
    matrices per crop.
    """
    import torch

    mean = torch.tensor(IMAGENET_MEAN, device=crops.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=crops.device).view(1, 3, 1, 1)
    grams = []
    for x in (crops - mean) / std:
        x = x[None]
        per_layer = []
        for layer in vgg:
            x = torch.relu(x) if isinstance(layer, torch.nn.ReLU) else layer(x)
            if isinstance(layer, torch.nn.Conv2d):
                per_layer.append(gram_matrix(x))
                if len(per_layer) == layers:
                    break
        if len(per_layer) < layers:
            raise ValueError(f"`vgg` has {len(per_layer)} convolutions; the style loss needs {layers}.")
        grams.append(per_layer)
    return grams


def intra_style_loss(panorama, window=DEFAULT_WINDOW, stride=DEFAULT_WINDOW, vgg=None):
    """Intra-Style-L: the Gram-matrix style loss between a panorama's crops, **summed** over all pairs (lower =
    more coherent).

    Exactly the authors' `eval_style_loss.py` (after the PyTorch neural-style tutorial, Gatys et al. 2015): the
    panorama is resized (bilinear) so that its shorter side is `window` (512 by default, as theirs; `style_size`), cut
    into `crop_boxes(window, stride)`, and for every pair `i < j` of crops the MSE between their Gram matrices at the
    outputs of conv_1 .. conv_5 of VGG-19 (ImageNet-normalized input, before the ReLUs) is added over the five
    layers. The authors' script sums over the pairs rather than averaging, so the score grows with the number of
    crops: compare panoramas of the same size and stride only. For several panoramas, the mean of their scores.

    `vgg` is a VGG-19 `features` module (default: torchvision's ImageNet weights).
    """
    import torch
    import torch.nn.functional as F
    from torchvision.transforms.functional import InterpolationMode, resize

    vgg = vgg if vgg is not None else load_vgg19()
    device = _device_of(vgg)
    scores = []
    for image in _image_list(panorama):
        image = image if not isinstance(image, torch.Tensor) else to_tensor(image)
        height, width = _size(image)
        boxes = intra_crop_boxes(height, width, window, stride, "intra-style")
        image = resize(
            image, list(style_size(height, width, window)), interpolation=InterpolationMode.BILINEAR, antialias=True
        )
        with torch.no_grad():
            grams = style_grams(crop(image, boxes).to(device), vgg)
        total = 0.0
        for i, j in itertools.combinations(range(len(grams)), 2):
            total += sum(F.mse_loss(b, a).item() for a, b in zip(grams[i], grams[j]))
        scores.append(total)
    return sum(scores) / len(scores)


# ----------------------------------------------------------------------------------------------------------------
# Prompt fidelity and image quality
# ----------------------------------------------------------------------------------------------------------------


def clip_score(images, prompts, model=DEFAULT_CLIP_MODEL, batch_size=32):
    """CLIP score of `images` (crops) against `prompts` (one string for all, or one per image), averaged over the
    images: `100 * max(cos(image embedding, text embedding), 0)`, torchmetrics' `CLIPScore` formula, which the
    authors used (higher = closer to the prompt).

    `model` is a Hub id or local folder of a transformers CLIP model (default the authors'
    `openai/clip-vit-base-patch16`), or a `(CLIPModel, CLIPProcessor)` pair. Computed here rather than with
    torchmetrics' class, which breaks on transformers 5 (`get_image_features` returns an output object there);
    images go to the processor as `uint8`, as torchmetrics and the authors give them.
    """
    import torch

    clip_model, processor = load_clip(model) if isinstance(model, str) else model
    images = _image_list(images)
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"`prompts` has {len(prompts)} entries for {len(images)} images; give one or one per image.")
    device = _device_of(clip_model)
    max_length = clip_model.config.text_config.max_position_embeddings
    scores = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            pixels = processor(images=[to_uint8(i) for i in images[start : start + batch_size]], return_tensors="pt")
            text = processor(
                text=prompts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            image_embeds = _embedding(clip_model.get_image_features(pixel_values=pixels["pixel_values"].to(device)))
            text_embeds = _embedding(
                clip_model.get_text_features(
                    input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device)
                )
            )
            cosine = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
            scores.append((100 * cosine).clamp(min=0).cpu())
    return torch.cat(scores).mean().item()


def _embedding(output):
    """The projected embedding from `get_*_features`: a tensor (transformers 4) or an output whose
    `pooler_output` holds it (transformers 5)."""
    return output if not hasattr(output, "pooler_output") else output.pooler_output


def image_features(images, features=None, batch_size=16):
    """`(N, D)` float64 features of `images` from `features`, a module taking `uint8` `(n, 3, H, W)` images
    (default torchmetrics' FID Inception-v3, pool3, D = 2048). Images of different sizes are run separately."""
    import torch

    features = features if features is not None else load_inception()
    device = _device_of(features)
    images = [to_uint8(image) for image in _image_list(images)]
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            groups = [chunk] if len({tuple(i.shape) for i in chunk}) == 1 else [[i] for i in chunk]
            for group in groups:
                out.append(features(torch.stack(group).to(device)).reshape(len(group), -1).double().cpu())
    return torch.cat(out)


class _Precomputed:
    """Stand-in "network" for torchmetrics' FID and KID that returns the features it is given, so the Inception
    features computed once serve FID, KID and GIQA."""

    def __new__(cls, num_features):
        import torch

        class Identity(torch.nn.Module):
            def forward(self, x):
                return x

        module = Identity()
        module.num_features = num_features
        return module


def fid_kid_from_features(features, reference_features, subset_size=None, subsets=100, seed=0):
    """torchmetrics' FID and KID of `(N, D)` features against `(M, D)` reference features.

    KID's `subset_size` defaults to clean-fid's rule (the authors' library): `min(N, M, 1000)`; an explicit one
    larger than a set raises a `ValueError`. Returns `{"fid", "kid", "kid_std"}`.
    """
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n, m = len(features), len(reference_features)
    if min(n, m) < 2:
        raise ValueError(f"FID and KID need at least 2 images in each set, got {n} images and {m} reference images.")
    if subset_size is None:
        subset_size = min(n, m, 1000)
    elif subset_size > min(n, m):
        raise ValueError(
            f"`subset_size` {subset_size} (KID) is larger than a set: {n} images, {m} reference images; use at"
            f" most {min(n, m)}, or more images."
        )
    dim = features.shape[1]
    fid = FrechetInceptionDistance(feature=_Precomputed(dim))
    fid.update(reference_features, real=True)
    fid.update(features, real=False)
    with warnings.catch_warnings():  # "KID keeps every feature in memory": a few thousand crops here
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Precomputed(dim), subsets=subsets, subset_size=subset_size)
    kid.update(reference_features, real=True)
    kid.update(features, real=False)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # KID draws random subsets
    try:
        kid_mean, kid_std = kid.compute()
    finally:
        torch.random.set_rng_state(state)
    return {"fid": fid.compute().item(), "kid": kid_mean.item(), "kid_std": kid_std.item()}


def fid_kid(images, reference_images, features=None, subset_size=None, subsets=100, seed=0):
    """FID and KID (torchmetrics) of `images` (window crops of the panoramas) against `reference_images` (single
    images of the base model at window size); lower = closer to the base model's images.

    `features` maps `uint8` images to features (default torchmetrics' Inception-v3, which needs torch-fidelity).
    Returns `{"fid", "kid", "kid_std"}`. The authors used clean-fid, which resizes with PIL before Inception;
    torchmetrics resizes inside the network, so values differ a little from theirs.
    """
    features = features if features is not None else load_inception()
    return fid_kid_from_features(
        image_features(images, features), image_features(reference_images, features), subset_size, subsets, seed
    )


def giqa_from_features(features, reference_features, k=8):
    """KNN-GIQA score of each of `(N, D)` features against `(M, D)` reference features.

    The official GIQA code (github.com/cientgu/GIQA, `knn_score.py`; Gu, Bao, Chen, Wen, "GIQA: Generated Image
    Quality Assessment", ECCV 2020): with `d_1 <= ... <= d_K` the L1 distances from the image's feature to its K
    nearest reference features (`F.pairwise_distance(p=1)`, which adds 1e-6 to the difference),
    `score = sum_k 1 / d_k`. Higher = more like the reference images.
    """
    import torch

    if not (isinstance(k, int) and 0 < k <= len(reference_features)):
        raise ValueError(f"`k` must be between 1 and the {len(reference_features)} reference images, got {k!r}.")
    distances = torch.cdist(features.double() + 1e-6, reference_features.double(), p=1)
    nearest = distances.topk(k, dim=1, largest=False).values
    return (1 / nearest).sum(dim=1)


def giqa(images, reference_images, k=8, features=None):
    """Mean-GIQA: the KNN-GIQA score (K = 8, the authors' choice) of each image (crop), averaged over the images.

    See `giqa_from_features` for the formula. `features` is the same network as FID's (default torchmetrics'
    Inception-v3 pool3 features).
    """
    features = features if features is not None else load_inception()
    scores = giqa_from_features(image_features(images, features), image_features(reference_images, features), k)
    return scores.mean().item()


# ----------------------------------------------------------------------------------------------------------------
# Pretrained networks
# ----------------------------------------------------------------------------------------------------------------


def _torch_cache():
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _unavailable(what, how, error):
    return WeightsUnavailable(
        f"{what}: the weights are not in the cache and cannot be downloaded ({type(error).__name__}). {how}"
    )


@functools.lru_cache(maxsize=None)
def load_lpips(device="cpu"):
    """`lpips.LPIPS(net="vgg")` (its VGG-16 backbone from torchvision, downloaded once)."""
    import lpips

    try:
        with contextlib.redirect_stdout(sys.stderr):  # torch.hub's "Downloading ..." line: keep stdout the table
            module = lpips.LPIPS(net="vgg", verbose=False)
    except (OSError, RuntimeError) as error:
        raise _unavailable(
            "LPIPS-VGG (intra-LPIPS)",
            f"Put torchvision's vgg16-397923af.pth in {_torch_cache()} (or set TORCH_HOME to a folder holding"
            " hub/checkpoints/vgg16-397923af.pth).",
            error,
        ) from None
    return module.eval().requires_grad_(False).to(device)


@functools.lru_cache(maxsize=None)
def load_vgg19(device="cpu"):
    """torchvision's VGG-19 `features` with ImageNet weights (downloaded once)."""
    from torchvision.models import VGG19_Weights, vgg19

    try:
        with contextlib.redirect_stdout(sys.stderr):
            module = vgg19(weights=VGG19_Weights.IMAGENET1K_V1).features
    except (OSError, RuntimeError) as error:
        raise _unavailable(
            "VGG-19 (intra-style loss)",
            f"Put torchvision's vgg19-dcbb9e9d.pth in {_torch_cache()} (or set TORCH_HOME).",
            error,
        ) from None
    return module.eval().requires_grad_(False).to(device)


@functools.lru_cache(maxsize=None)
def load_inception(weights=None, device="cpu"):
    """torchmetrics' FID Inception-v3 (torch-fidelity's port of the TensorFlow FID network), pool3 features;
    `weights` a local copy of its state dict (default: downloaded once into torch's hub cache)."""
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        module = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights
        )
    except ModuleNotFoundError:
        raise WeightsUnavailable(
            "FID, KID and GIQA need torch-fidelity: pip install 'syncdiffusion[eval]' (or torch-fidelity)."
        ) from None
    except (OSError, RuntimeError) as error:
        raise _unavailable(
            "Inception-v3 (FID, KID, GIQA)",
            "Pass --inception-weights PATH to a copy of torch-fidelity's weights-inception-2015-12-05-6726825d.pth,"
            f" or put it in {_torch_cache()} (or set TORCH_HOME).",
            error,
        ) from None
    return module.to(device)


@functools.lru_cache(maxsize=None)
def load_clip(model=DEFAULT_CLIP_MODEL, device="cpu"):
    """`(CLIPModel, CLIPProcessor)` from a Hub id or a local folder."""
    from transformers import CLIPModel, CLIPProcessor

    from syncdiffusion_utils.loading import _quiet_loading

    def load(local_files_only):
        with _quiet_loading():
            return (
                CLIPModel.from_pretrained(model, local_files_only=local_files_only),
                CLIPProcessor.from_pretrained(model, local_files_only=local_files_only),
            )

    try:
        try:  # the cache first: no network round trips (and retries) when the model is already here
            clip_model, processor = load(True)
        except (OSError, ValueError):
            clip_model, processor = load(False)
    except (OSError, ValueError) as error:
        raise WeightsUnavailable(
            f"CLIP model {model!r} (CLIP score): cannot load it ({type(error).__name__}). Run `hf download {model}`"
            " where there is network (or set HF_HOME to a cache that has it), or pass a local folder with --clip-model."
        ) from None
    return clip_model.eval().requires_grad_(False).to(device), processor


class RandomFeatures:
    """A small random-weight feature network in FID's calling convention (`uint8` images in, `(N, 16)` out), for
    offline tests and smoke runs."""

    def __new__(cls, seed=0, dim=16):
        import torch

        class Features(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(seed)
                self.net = torch.nn.Sequential(
                    torch.nn.Conv2d(3, dim, 3, stride=2),
                    torch.nn.ReLU(),
                    torch.nn.Conv2d(dim, dim, 3, stride=2),
                    torch.nn.AdaptiveAvgPool2d(1),
                    torch.nn.Flatten(),
                )
                self.num_features = dim

            def forward(self, images):
                return self.net(images.float() / 255)

        return Features().eval().requires_grad_(False)


def random_clip(seed=0, image_size=32):
    """A tiny random-weight `(CLIPModel, CLIPProcessor)` with the project's character-level tokenizer (offline)."""
    import tempfile

    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from syncdiffusion_utils.testing import make_tokenizer

    with tempfile.TemporaryDirectory(prefix="syncdiffusion-clip-") as folder:
        tokenizer = make_tokenizer(folder)
    torch.manual_seed(seed)
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **small,
        ),
        vision_config=dict(image_size=image_size, patch_size=8, **small),
        projection_dim=16,
    )
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
    )
    return CLIPModel(config).eval().requires_grad_(False), processor


def random_networks(seed=0, lpips_module=None):
    """Random-weight stand-ins for every metric's network (offline; the scores mean nothing): `{"lpips", "vgg",
    "clip", "features"}`. `lpips_module` reuses an already built random LPIPS (building one takes seconds)."""
    import torch
    from torchvision.models.vgg import cfgs, make_layers

    from syncdiffusion_utils.testing import make_lpips

    torch.manual_seed(seed)
    vgg = make_layers(cfgs["E"])  # VGG-19's `features` (without building its 100M-parameter classifier)
    return {
        "lpips": lpips_module if lpips_module is not None else make_lpips(seed),
        "vgg": vgg.eval().requires_grad_(False),
        "clip": random_clip(seed),
        "features": RandomFeatures(seed),
    }
