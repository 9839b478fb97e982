"""SyncDiffusion's evaluation: coherence (intra-LPIPS, intra-style loss), prompt fidelity (CLIP score) and image
quality (FID, KID, Mean-GIQA), as functions on images and as the `syncdiffusion evaluate` command.

    syncdiffusion evaluate sets/multidiffusion sets/syncdiffusion --reference sets/single --json eval.json --plot eval.png

The protocol is the authors' (SyncDiffusion, NeurIPS 2023, `eval_code/` of
github.com/KAIST-Visual-AI-Group/SyncDiffusion):

- coherence is measured on the panorama's `window`-sized crops taken every `stride` pixels, row-major from the
  top-left (`crop_boxes`), over all pairs of crops;
- prompt fidelity and quality are measured on random `window`-sized crops of each panorama (`random_crop_boxes`),
  FID, KID and GIQA against single images of the base model at window size.

Images are PIL images or float tensors `(3, H, W)` in [0, 1]. Every metric takes its network as an argument; left
out, the pretrained one is loaded (and downloaded once) on first use. Lower intra-LPIPS, intra-style loss, FID and
KID are better; higher CLIP score and GIQA are better.

torch, torchvision, torchmetrics and matplotlib are imported inside the functions, so `syncdiffusion --help` stays
instant. `pip install "syncdiffusion[eval]"` installs what the metrics need beyond the pipeline.
"""

import contextlib
import csv
import functools
import itertools
import json
import os
import sys
import warnings

from syncdiffusion_utils.cli import CLIError, _Parser, _positive_int, check_device, note, resolve_device


DEFAULT_WINDOW = 512  # the authors' crop size: Stable Diffusion 2 base's image size
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch16"  # the authors'
STYLE_LAYERS = 5  # conv_1 .. conv_5 of VGG-19, as in the authors' eval_style_loss.py
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# name: (column title, what higher means, needs). The directions are the paper's (Table 1 of the SyncDiffusion paper).
METRICS = {
    "intra-lpips": ("Intra-LPIPS", "lower", "panorama"),
    "intra-style": ("Intra-Style-L", "lower", "panorama"),
    "clip": ("Mean-CLIP-S", "higher", "prompt"),
    "giqa": ("Mean-GIQA", "higher", "reference"),
    "fid": ("FID", "lower", "reference"),
    "kid": ("KID", "lower", "reference"),
}
SET_METRICS = ("fid", "kid")  # one number per set, not per panorama


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
        height, width = _size(image)
        crops = crop(image, crop_boxes(height, width, window, stride)).to(device) * 2 - 1
        pairs = list(itertools.combinations(range(len(crops)), 2))
        if not pairs:
            raise ValueError(f"a {width}x{height} panorama has one {window}-pixel crop at stride {stride}: no pairs.")
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
    panorama is resized (bilinear) so that its shorter side is `window` (512 by default, as theirs), cut into
    `crop_boxes(window, stride)`, and for every pair `i < j` of crops the MSE between their Gram matrices at the
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
        image = resize(image, window, interpolation=InterpolationMode.BILINEAR, antialias=True)
        height, width = _size(image)
        with torch.no_grad():
            grams = style_grams(crop(image, crop_boxes(height, width, window, stride)).to(device), vgg)
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

    from syncdiffusion_utils.cli import _quiet_loading

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


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------

INDEX = "index.json"  # written by `syncdiffusion generate-set`: each image's prompt and seed
PLOT_EXTENSIONS = (".png", ".pdf", ".svg", ".jpg")


def build_parser():
    parser = _Parser(
        prog="syncdiffusion evaluate",
        description=(
            "Score folders of panoramas (one folder per method or setting) with SyncDiffusion's metrics: coherence"
            " (intra-LPIPS, intra-style loss; lower is better), prompt fidelity (CLIP score; higher is better) and,"
            " with --reference, quality against single images of the base model (FID, KID: lower; GIQA: higher)."
            " Prints a Markdown table (mean ± std over panoramas)."
        ),
        epilog=(
            "Example: syncdiffusion evaluate sets/multidiffusion sets/syncdiffusion --reference sets/single"
            " --json eval.json --plot eval.png. Prompts come from --prompt, or from the index.json that"
            " `syncdiffusion generate-set` writes. Offline smoke run: --networks random."
        ),
    )
    parser.add_argument("folders", nargs="+", metavar="PANORAMA_DIR", help="a folder of panoramas per method")
    parser.add_argument("--prompt", help="the prompt of every panorama (default: from each folder's index.json)")
    parser.add_argument(
        "--reference", metavar="DIR", help="single images of the base model at window size (FID, KID, GIQA)"
    )
    parser.add_argument("--labels", help="comma-separated row names, one per folder (default: the folder names)")
    parser.add_argument("--metrics", help=f"comma-separated, from {', '.join(METRICS)} (default: all that apply)")
    parser.add_argument(
        "--window", type=_positive_int, default=DEFAULT_WINDOW, help="crop size in pixels (default: 512)"
    )
    parser.add_argument(
        "--stride", type=_positive_int, default=DEFAULT_WINDOW, help="intra-metric crop stride (default: 512)"
    )
    parser.add_argument(
        "--crops",
        type=_positive_int,
        default=1,
        help="random crops per panorama for CLIP, FID, KID, GIQA (default: 1, the authors')",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random crops (default: 0)")
    parser.add_argument("--giqa-k", type=_positive_int, default=8, help="K of KNN-GIQA (default: 8, the authors')")
    parser.add_argument(
        "--kid-subset-size", type=_positive_int, help="KID subset size (default: min(set sizes, 1000))"
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--csv", metavar="PATH", help="write the table as CSV")
    parser.add_argument("--plot", metavar="PATH", help="write a bar chart per metric (.png, .pdf, .svg)")
    parser.add_argument(
        "--clip-model", default=DEFAULT_CLIP_MODEL, help=f"Hub id or local folder (default: {DEFAULT_CLIP_MODEL})"
    )
    parser.add_argument(
        "--inception-weights", metavar="PATH", help="local copy of torch-fidelity's Inception weights (FID, KID, GIQA)"
    )
    parser.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default)")
    parser.add_argument(
        "--networks",
        choices=("pretrained", "random"),
        default="pretrained",
        help="random: random-weight networks, offline, for a smoke run (the scores mean nothing)",
    )
    return parser


def _list_images(folder, flag):
    if not os.path.isdir(folder):
        raise CLIError(f"{flag} {folder!r}: no such folder.")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise CLIError(f"{flag} {folder!r}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder.")
    return [os.path.join(folder, f) for f in files]


def _image_size(path, flag):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, UnidentifiedImageError) as error:
        raise CLIError(f"{flag}: cannot read {path!r} as an image: {error}.") from None


def _index_prompts(folder):
    """`{file name: prompt}` from the folder's index.json (written by `generate-set`), or {} without one."""
    path = os.path.join(folder, INDEX)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return {entry["file"]: entry["prompt"] for entry in json.load(f)["images"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CLIError(f"{path!r}: not an index written by `syncdiffusion generate-set` ({error}).") from None


def _check_output(path, flag, extensions=None):
    if path is None:
        return
    if extensions and os.path.splitext(path)[1].lower() not in extensions:
        raise CLIError(f"{flag} {path!r}: use one of the extensions {', '.join(extensions)}.", code=2)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"{flag} {path!r}: the directory {folder} does not exist.")


def _choose_metrics(args, have_prompts):
    """The metrics to compute: the ones asked for (each must be computable), or all that apply."""
    needs = {"panorama": True, "prompt": have_prompts, "reference": args.reference is not None}
    if args.metrics is None:
        chosen = [name for name, (_, _, need) in METRICS.items() if needs[need]]
        skipped = [name for name in METRICS if name not in chosen]
        if skipped:
            why = " (no --reference)" if not needs["reference"] else ""
            why += " (no --prompt and no index.json prompts)" if not needs["prompt"] else ""
            args.skipped_note = f"not computing {', '.join(skipped)}{why}."
        return chosen
    chosen = [name.strip() for name in args.metrics.split(",") if name.strip()]
    for name in chosen:
        if name not in METRICS:
            raise CLIError(f"--metrics: unknown metric {name!r}; choose from {', '.join(METRICS)}.", code=2)
        need = METRICS[name][2]
        if need == "reference" and not needs["reference"]:
            raise CLIError(f"--metrics {name}: needs --reference DIR (single images of the base model).", code=2)
        if need == "prompt" and not needs["prompt"]:
            raise CLIError(
                f"--metrics {name}: needs --prompt (or an index.json from generate-set in every folder).", 2
            )
    return chosen


def _plan(args):
    """Check every input before any network loads; returns `(sets, reference_files, metrics)`."""
    labels = [label.strip() for label in args.labels.split(",")] if args.labels else None
    if labels is not None and len(labels) != len(args.folders):
        raise CLIError(f"--labels: {len(labels)} labels for {len(args.folders)} folders; give one per folder.", 2)
    for path, flag, extensions in (
        (args.json, "--json", None),
        (args.csv, "--csv", None),
        (args.plot, "--plot", PLOT_EXTENSIONS),
    ):
        _check_output(path, flag, extensions)

    sets = []
    for i, folder in enumerate(args.folders):
        files = _list_images(folder, "PANORAMA_DIR")
        index = _index_prompts(folder) if args.prompt is None else {}
        sizes = [_image_size(path, "PANORAMA_DIR") for path in files]
        for path, (height, width) in zip(files, sizes):
            if height < args.window or width < args.window:
                raise CLIError(f"{path!r} is {width}x{height} pixels, smaller than --window {args.window}.", 2)
        prompts = [args.prompt if args.prompt is not None else index.get(os.path.basename(p)) for p in files]
        label = labels[i] if labels else os.path.basename(os.path.normpath(folder))
        sets.append({"label": label, "folder": folder, "files": files, "sizes": sizes, "prompts": prompts})

    have_prompts = all(p is not None for s in sets for p in s["prompts"])
    metrics = _choose_metrics(args, have_prompts)
    if {"intra-lpips", "intra-style"} & set(metrics):
        for s in sets:
            for path, (height, width) in zip(s["files"], s["sizes"]):
                style_width = round(width * args.window / min(height, width))  # the style loss resizes first
                for w, h in ((width, height), (style_width, args.window)):
                    if len(crop_boxes(h, w, args.window, args.stride)) < 2:
                        raise CLIError(
                            f"{path!r} ({width}x{height}) has one {args.window}-pixel crop at --stride {args.stride}:"
                            " the intra metrics compare pairs of crops; use a smaller --stride or --window.",
                            2,
                        )

    reference = None
    if {"fid", "kid", "giqa"} & set(metrics):
        reference = _list_images(args.reference, "--reference")
        count = len(reference)
        if count < 2:
            raise CLIError(f"--reference {args.reference!r}: FID and KID need at least 2 images, found {count}.")
        if "giqa" in metrics and args.giqa_k > count:
            raise CLIError(f"--giqa-k {args.giqa_k}: larger than the {count} reference images.", 2)
        smallest = min([count] + [len(s["files"]) * args.crops for s in sets])
        if "kid" in metrics and args.kid_subset_size is not None and args.kid_subset_size > smallest:
            raise CLIError(
                f"--kid-subset-size {args.kid_subset_size}: larger than the smallest set ({smallest} images or"
                f" crops); use at most {smallest}, more --crops, or more images.",
                2,
            )
        for s in sets:
            if len(s["files"]) * args.crops < 2:
                raise CLIError(
                    f"{s['folder']!r}: FID and KID need at least 2 crops; use --crops 2 or more panoramas.", 2
                )
    if getattr(args, "skipped_note", None):  # only once every input is known to be good
        note(args.skipped_note)
    return sets, reference, metrics


def _load_networks(args, metrics, device):
    """The networks `metrics` need, on `device`."""
    if args.networks == "random":
        return random_networks()
    networks = {}
    try:
        if "intra-lpips" in metrics:
            networks["lpips"] = load_lpips()
        if "intra-style" in metrics:
            networks["vgg"] = load_vgg19()
        if "clip" in metrics:
            networks["clip"] = load_clip(args.clip_model)
        if {"fid", "kid", "giqa"} & set(metrics):
            networks["features"] = load_inception(args.inception_weights)
    except WeightsUnavailable as error:
        raise CLIError(str(error)) from None
    return networks


def _to_device(networks, device):
    moved = {}
    for name, network in networks.items():
        if name == "clip":
            moved[name] = (network[0].to(device), network[1])
        else:
            moved[name] = network.to(device)
    return moved


def _mean_std(values):
    import numpy as np

    return {"mean": float(np.mean(values)), "std": float(np.std(values))}  # population std, as the authors' scripts


def evaluate_set(
    files,
    prompts,
    metrics,
    networks,
    window,
    stride,
    crops,
    seed,
    reference_features=None,
    giqa_k=8,
    kid_subset_size=None,
    label=None,
):
    """Score one folder's panoramas: `{"metrics": {name: {"mean", "std"}}, "panoramas": [per-panorama scores]}`.

    Per-panorama metrics are averaged over the panoramas (population std); FID and KID are one number for the set
    (KID's std is over its random subsets). The random crops are drawn from `seed`, the same for every set.
    """
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    generator = np.random.default_rng(seed)
    per_panorama, crop_features = [], []
    for path, prompt in tqdm(list(zip(files, prompts)), desc=label, unit="panorama", file=sys.stderr):
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        scores = {"file": os.path.basename(path)}
        if "intra-lpips" in metrics:
            scores["intra-lpips"] = intra_lpips(image, window, stride, loss=networks["lpips"])
        if "intra-style" in metrics:
            scores["intra-style"] = intra_style_loss(image, window, stride, vgg=networks["vgg"])
        boxes = random_crop_boxes(image.height, image.width, window, crops, generator)
        pieces = list(crop(image, boxes))
        if "clip" in metrics:
            scores["clip"] = clip_score(pieces, prompt, model=networks["clip"])
        if reference_features is not None:
            features = image_features(pieces, networks["features"])
            crop_features.append(features)
            if "giqa" in metrics:
                scores["giqa"] = giqa_from_features(features, reference_features, giqa_k).mean().item()
        per_panorama.append(scores)

    summary = {name: _mean_std([s[name] for s in per_panorama]) for name in metrics if name not in SET_METRICS}
    if {"fid", "kid"} & set(metrics):
        import torch

        values = fid_kid_from_features(torch.cat(crop_features), reference_features, kid_subset_size)
        if "fid" in metrics:
            summary["fid"] = {"mean": values["fid"], "std": None}
        if "kid" in metrics:
            summary["kid"] = {"mean": values["kid"], "std": values["kid_std"]}
    return {"metrics": {name: summary[name] for name in metrics}, "panoramas": per_panorama}


def _column(name):
    title, better, _ = METRICS[name]
    return f"{title} {'↓' if better == 'lower' else '↑'}"


def _cell(value):
    if value is None:
        return "—"
    text = f"{value['mean']:.4g}"
    return text if value["std"] is None else f"{text} ± {value['std']:.2g}"


def markdown_table(results):
    """The results as a Markdown table: one row per set, one column per metric (mean ± std)."""
    metrics = list(results[0]["metrics"])
    header = ["set", "panoramas"] + [_column(name) for name in metrics]
    rows = [[r["label"], str(len(r["panoramas"]))] + [_cell(r["metrics"][name]) for name in metrics] for r in results]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(results, path):
    metrics = list(results[0]["metrics"])
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["set", "folder", "panoramas"] + [f"{n}_{k}" for n in metrics for k in ("mean", "std")])
        for r in results:
            values = [r["metrics"][n][k] for n in metrics for k in ("mean", "std")]
            writer.writerow([r["label"], r["folder"], len(r["panoramas"])] + ["" if v is None else v for v in values])


def plot(results, path):
    """One bar chart per metric, the sets side by side, error bars at ± std, the better direction in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(results[0]["metrics"])
    labels = [r["label"] for r in results]
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(results))]
    figure, axes = plt.subplots(
        1, len(metrics), figsize=(max(3.0, 0.9 * len(results) + 1.2) * len(metrics), 3.6), squeeze=False
    )
    for axis, name in zip(axes[0], metrics):
        title, better, _ = METRICS[name]
        means = [r["metrics"][name]["mean"] for r in results]
        stds = [r["metrics"][name]["std"] for r in results]
        yerr = None if all(std is None for std in stds) else [std or 0.0 for std in stds]  # FID has no spread
        axis.bar(range(len(results)), means, yerr=yerr, color=colors, capsize=4)
        axis.set_xticks(
            range(len(results)),
            labels,
            rotation=30 if len(results) > 2 else 0,
            ha="right" if len(results) > 2 else "center",
        )
        axis.set_title(f"{title}\n({better} is better)", fontsize=10)
        axis.grid(axis="y", alpha=0.3)
        axis.set_axisbelow(True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    """`syncdiffusion evaluate ...`: returns the exit status; errors are `CLIError`s (one line)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    sets, reference, metrics = _plan(args)
    device = resolve_device(args.device)
    check_device(device)
    networks = _to_device(_load_networks(args, metrics, device), device)

    reference_features = None
    if reference is not None:
        from PIL import Image

        def read(path):
            with Image.open(path) as image:
                return image.convert("RGB")

        reference_features = image_features([read(p) for p in reference], networks["features"])
    results = []
    for s in sets:
        scored = evaluate_set(
            s["files"],
            s["prompts"],
            metrics,
            networks,
            args.window,
            args.stride,
            args.crops,
            args.seed,
            reference_features,
            args.giqa_k,
            args.kid_subset_size,
            label=s["label"],
        )
        results.append({"label": s["label"], "folder": s["folder"], **scored})

    print(markdown_table(results), flush=True)
    settings = {
        "window": args.window,
        "stride": args.stride,
        "crops": args.crops,
        "seed": args.seed,
        "reference": args.reference,
        "giqa_k": args.giqa_k,
        "networks": args.networks,
        "clip_model": args.clip_model if "clip" in metrics else None,
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"settings": settings, "sets": results}, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.csv:
        write_csv(results, args.csv)
        print(f"wrote {args.csv}", file=sys.stderr)
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from syncdiffusion_utils.cli import main as _cli_main

    sys.exit(_cli_main(["evaluate"] + sys.argv[1:]))
