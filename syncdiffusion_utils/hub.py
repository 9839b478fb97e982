"""Publish a SyncDiffusion pipeline to the Hugging Face Hub, as a custom pipeline or as a ready-to-use model.

Any of the classes: `SyncDiffusionPipeline` (SD 1.x/2.x, the default), `SyncDiffusionXLPipeline` (SDXL),
`SyncDiffusionControlNetPipeline` (SD with a ControlNet), `SyncDiffusionFluxPipeline` (FLUX.1),
`SyncDiffusionFlux2KleinPipeline` (FLUX.2 [klein]) and `SyncDiffusionZImagePipeline` (Z-Image), or a subclass of one.
The uploaded source is the class's own file (`inspect.getsourcefile`) and the model card's parameter table is read
from its `__call__`.

`publish(repo_id, pipeline_class=...)` uploads the pipeline file as `pipeline.py` and a model card as `README.md`, so
that

    DiffusionPipeline.from_pretrained(model, custom_pipeline=repo_id, trust_remote_code=True)

loads it. `publish_model(pipe, repo_id)` uploads a whole pipeline (weights, `syncdiffusion.py`, model card), so that

    DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)

loads it; `export(pipe, folder)` writes the same files to a local folder. Both take the class of `pipe`.
"""

import inspect
import os
import re
import tempfile

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id


PIPELINE_FILENAME = "pipeline.py"  # the file name diffusers looks for in a `custom_pipeline` repo
MODEL_CARD_FILENAME = "README.md"

_CITATION = """\
@article{lee2023syncdiffusion,
    title={SyncDiffusion: Coherent Montage via Synchronized Joint Diffusions},
    author={Yuseung Lee and Kunho Kim and Hyunjin Kim and Minhyuk Sung},
    journal={arXiv preprint arXiv:2306.05178},
    year={2023}
}"""

# What a model card says about each pipeline family (found by class name along the MRO, so subclasses and the copies
# diffusers imports from a repo's own file are found too).
_FAMILIES = {
    "SyncDiffusionPipeline": {
        "base_model": "stabilityai/stable-diffusion-2-base",
        "tags": ["stable-diffusion"],
        "weights": "any Stable Diffusion 1.x or 2.x checkpoint",
        "kind": "Stable Diffusion weights",
        "about": "It is a drop-in replacement for diffusers' deprecated `StableDiffusionPanoramaPipeline`: the same"
        " components and `__call__` arguments, with that pipeline's bugs fixed. With `sync_weight=0` it is"
        " MultiDiffusion.",
        "besides": "every argument of `StableDiffusionPanoramaPipeline`",
    },
    "SyncDiffusionXLPipeline": {
        "base_model": "stabilityai/stable-diffusion-xl-base-1.0",
        "tags": ["stable-diffusion-xl"],
        "weights": "any Stable Diffusion XL checkpoint",
        "kind": "Stable Diffusion XL weights",
        "about": "It brings SyncDiffusion to Stable Diffusion XL, with `StableDiffusionXLPipeline`'s components and"
        " text-to-image arguments (both text encoders, micro-conditioning). With `sync_weight=0` it is"
        " MultiDiffusion.",
        "besides": "the text-to-image arguments of `StableDiffusionXLPipeline`",
    },
    "SyncDiffusionControlNetPipeline": {
        "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "controlnet": "lllyasviel/control_v11f1p_sd15_depth",
        "tags": ["stable-diffusion", "controlnet"],
        "weights": "any Stable Diffusion 1.x or 2.x checkpoint with a ControlNet trained for it",
        "kind": "Stable Diffusion and ControlNet weights",
        "about": "The panorama follows one condition image as large as itself (depth, edges, pose, ...), cropped per"
        " view and given to a ControlNet in every UNet pass, the synchronization's gradient pass included. It takes"
        " `StableDiffusionControlNetPipeline`'s components and arguments; the panorama takes the condition's size.",
        "besides": "the arguments of `StableDiffusionControlNetPipeline`, such as `image`, `controlnet_conditioning_scale`"
        " and `guess_mode`",
    },
    "SyncDiffusionFluxPipeline": {
        "base_model": "black-forest-labs/FLUX.1-dev",
        "tags": ["flux"],
        "weights": "FLUX.1 [dev] or [schnell] (black-forest-labs/FLUX.1-dev, black-forest-labs/FLUX.1-schnell), under"
        " their own licenses ([dev] is gated: accept its license on the Hub, then `hf auth login`)",
        "kind": "FLUX.1 weights",
        "about": "It brings SyncDiffusion to FLUX.1 ([dev] and [schnell]), with `FluxPipeline`'s components and"
        " arguments (the guidance embedding, true CFG with a negative prompt, LoRAs, IP-Adapters). Every view is one"
        " FLUX image of the window's size: its crop of the latent packed with that image's ids, its sigmas shifted"
        " by the window's token count. The synchronization runs in FLUX's flow-matching terms (x0 = z - sigma v)."
        " The default `sync_weight=20` was tuned for Stable Diffusion 2, not for FLUX: compare a few values from one"
        " seed (e.g. 0, 10, 20 and 40) before settling on one. With `sync_weight=0` it is MultiDiffusion.",
        "besides": "every argument of `FluxPipeline`",
        "dtype": "bfloat16",
    },
    "SyncDiffusionFlux2KleinPipeline": {
        "base_model": "black-forest-labs/FLUX.2-klein-4B",
        "tags": ["flux2"],
        "weights": "FLUX.2 [klein]: the step-distilled black-forest-labs/FLUX.2-klein-4B and -9B or their base models"
        " (black-forest-labs/FLUX.2-klein-base-4B, -base-9B), under their own licenses",
        "kind": "FLUX.2 [klein] weights",
        "about": "It brings SyncDiffusion to FLUX.2 [klein], with `Flux2KleinPipeline`'s components and arguments"
        " (reference images, its classifier-free guidance with a negative prompt, `is_distilled`, LoRAs). Every view"
        " is one FLUX.2 image of the window's size: its crop of the latent packed with that image's position ids, its"
        " sigmas shifted by FLUX.2's empirical shift for the window's token count and the steps. The synchronization"
        " runs in flow-matching terms (x0 = z - sigma v). The step-distilled klein-4B and -9B take 4 steps without"
        " guidance (below); a base model takes the defaults, `Flux2KleinPipeline`'s 50 steps with"
        " `guidance_scale=4.0`. The default `sync_weight=20` was tuned for Stable Diffusion 2, not for FLUX.2: compare"
        " a few values from one seed (e.g. 0, 10, 20 and 40) before settling on one. With `sync_weight=0` it is"
        " MultiDiffusion.",
        "besides": "every argument of `Flux2KleinPipeline`",
        "dtype": "bfloat16",
        # The step-distilled base model's own settings: 4 steps, no guidance, the first 2 synchronized.
        "call": ("num_inference_steps=4", "guidance_scale=1.0", "sync_thres=2"),
    },
    "SyncDiffusionZImagePipeline": {
        "base_model": "Tongyi-MAI/Z-Image-Turbo",
        "tags": ["z-image"],
        "weights": "Z-Image (e.g. Tongyi-MAI/Z-Image-Turbo), under its own license",
        "kind": "Z-Image weights",
        "about": "It brings SyncDiffusion to Z-Image, with `ZImagePipeline`'s components and arguments (its"
        " classifier-free guidance with `cfg_normalization` and `cfg_truncation`, LoRAs). Every view is one Z-Image"
        " image of the window's size: its own position ids, the timestep shift of one window-sized image. The"
        " synchronization runs in flow-matching terms (x0 = z - sigma v). Z-Image-Turbo takes 8 steps without"
        " guidance (below); the defaults are `ZImagePipeline`'s 50 steps with `guidance_scale=5.0`. The default"
        " `sync_weight=20` was tuned for Stable Diffusion 2, not for Z-Image: compare a few values from one seed"
        " (e.g. 0, 10, 20 and 40) before settling on one. With `sync_weight=0` it is MultiDiffusion.",
        "besides": "every argument of `ZImagePipeline`",
        "dtype": "bfloat16",
        # Z-Image-Turbo's own settings: 8 steps, no guidance, the first 4 synchronized.
        "call": ("num_inference_steps=8", "guidance_scale=0.0", "sync_thres=4"),
    },
}

_MODEL_CARD = """\
---
library_name: diffusers
license: apache-2.0
pipeline_tag: text-to-image
tags:
{tags}
---

# SyncDiffusion custom pipeline: `{class_name}`

`{class_name}` generates coherent panoramas with [SyncDiffusion](https://huggingface.co/papers/2306.05178)
(Lee et al., NeurIPS 2023, arXiv:2306.05178). Like MultiDiffusion it denoises overlapping windows ("views") of a wide
latent and averages them; during the first steps it also moves every view down the gradient of the LPIPS distance
between its predicted image and an anchor view's, so that all windows agree on one scene instead of blending
different ones.

{about}

This repository holds only the pipeline code (`pipeline.py`); the weights come from {weights}.

## Usage

```bash
pip install diffusers transformers torch lpips
```

```python
{usage}
```

`trust_remote_code=True` runs this repository's `pipeline.py` on your machine: read it first, and pin a reviewed
version with `custom_revision="<commit>"`. The perceptual loss is LPIPS-VGG from the `lpips` package, imported on the
first synchronized call; `pipe.set_perceptual_loss(module)` replaces it.

## Parameters

Besides {besides} ({defaults}):

{parameters}

## Citation

```bibtex
{citation}
```
"""

_CUSTOM_USAGE = """\
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained(
    "{base_model}",
    custom_pipeline="{repo_id}",
    trust_remote_code=True,
    torch_dtype=torch.float16,
)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe = pipe.to("cuda")

image = pipe("a photo of a mountain range at twilight"{size}).images[0]
image.save("panorama.png")"""

_CUSTOM_CONTROLNET_USAGE = """\
import torch
from diffusers import ControlNetModel, DDIMScheduler, DiffusionPipeline
from diffusers.utils import load_image

controlnet = ControlNetModel.from_pretrained("{controlnet}", torch_dtype=torch.float16)
pipe = DiffusionPipeline.from_pretrained(
    "{base_model}",
    controlnet=controlnet,
    custom_pipeline="{repo_id}",
    trust_remote_code=True,
    torch_dtype=torch.float16,
)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe = pipe.to("cuda")

depth = load_image("depth_512x2048.png")  # the condition: the panorama takes its size
image = pipe("a photo of a mountain range at twilight", image=depth).images[0]
image.save("panorama.png")"""


_CUSTOM_FLUX_USAGE = """\
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained(
    "{base_model}",
    custom_pipeline="{repo_id}",
    trust_remote_code=True,
    torch_dtype=torch.bfloat16,
)
pipe = pipe.to("cuda")

{call}
image.save("panorama.png")"""


def _default_class():
    from pipeline_syncdiffusion import SyncDiffusionPipeline

    return SyncDiffusionPipeline


def _family(pipeline_class):
    """What the model card says about `pipeline_class`'s family; raises `ValueError` for another class."""
    for base in inspect.getmro(pipeline_class):
        if base.__name__ in _FAMILIES:
            return _FAMILIES[base.__name__]
    raise ValueError(
        f"`pipeline_class` {pipeline_class.__name__} is not a SyncDiffusion pipeline: give one of"
        f" {', '.join(_FAMILIES)} (or a subclass)."
    )


def _call_size(pipeline_class):
    """`, height=H, width=W` of the class's default size for a usage line ("" when the size comes from the input)."""
    parameters = inspect.signature(pipeline_class.__call__).parameters
    height, width = parameters["height"].default, parameters["width"].default
    return "" if height is None or width is None else f", height={height}, width={width}"


def _panorama_call(pipeline_class, family):
    """The usage's `image = pipe(...).images[0]` line of a bfloat16 class: the default size, the family's own
    settings (the base model's steps and guidance) and `view_batch_size="auto"`; one argument per line past 119
    columns, as ruff formats it."""
    size = [item.strip() for item in _call_size(pipeline_class).split(",") if item.strip()]
    arguments = ['"a photo of a mountain range at twilight"', *size, *family.get("call", ()), 'view_batch_size="auto"']
    line = f"image = pipe({', '.join(arguments)}).images[0]"
    if len(line) <= 119:
        return line
    return "image = pipe(\n" + "".join(f"    {argument},\n" for argument in arguments) + ").images[0]"


def _call_defaults_text(pipeline_class):
    """ "same defaults: `height=512`, ..." for the arguments every card names, as the class's signature has them."""
    parameters = inspect.signature(pipeline_class.__call__).parameters
    names = ("height", "width", "num_inference_steps", "guidance_scale", "view_batch_size", "circular_padding")
    shown = [f"`{name}={parameters[name].default!r}`" for name in names if name in parameters]
    return "defaults: " + ", ".join(shown) + ", ..."


def pipeline_source(pipeline_class=None) -> str:
    """The text of `pipeline_class`'s source file (default: `SyncDiffusionPipeline`'s), line endings untouched."""
    pipeline_class = _default_class() if pipeline_class is None else pipeline_class
    with open(inspect.getsourcefile(pipeline_class), encoding="utf-8", newline="") as f:
        return f.read()


def _sync_parameters(pipeline_class) -> list[tuple[str, object, str]]:
    """`(name, default, description)` of `window_size` (FLUX), `stride` and every `sync_*` argument of
    `pipeline_class.__call__`.

    Read from its signature and its docstring, so the model card always matches the uploaded file.
    """
    doc = pipeline_class.__call__.__doc__ or ""
    parameters = []
    for name, parameter in inspect.signature(pipeline_class.__call__).parameters.items():
        if name not in ("window_size", "stride") and not name.startswith("sync_"):
            continue
        # An argument is documented as `name (type):` followed by lines indented deeper than that header.
        match = re.search(rf"^( *){name} \(.*\):\n((?:\1 +\S.*\n?)+)", doc, re.M)
        description = " ".join(match.group(2).split()) if match else ""
        description = re.sub(r"\[`~?(?:[\w.]+\.)?(\w+)`\]", r"`\1`", description)  # [`~a.B`] -> `B`
        parameters.append((name, parameter.default, description))
    return parameters


def _parameters_table(pipeline_class) -> str:
    rows = ["| Parameter | Default | Meaning |", "|---|---|---|"]
    for name, default, description in _sync_parameters(pipeline_class):
        shown = f'"{default}"' if isinstance(default, str) else repr(default)
        rows.append(f"| `{name}` | `{shown}` | {description.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


def _tags(family):
    tags = ["diffusers", "text-to-image", "panorama", *family["tags"], "syncdiffusion"]
    return "\n".join(f"- {tag}" for tag in tags)


def _fill(template, fields):
    for field, value in fields.items():
        template = template.replace("{" + field + "}", value)
    return template


_MODEL_REPO_CARD = """\
---
library_name: diffusers
pipeline_tag: text-to-image
{base_model}tags:
{tags}
---

# {name}: SyncDiffusion panoramas

{weights} with the [SyncDiffusion](https://huggingface.co/papers/2306.05178) pipeline `{class_name}` (Lee et al.,
NeurIPS 2023): coherent panoramas from overlapping windows that are synchronized by an LPIPS gradient. The repository
holds the weights and the pipeline code, the `.py` file that `model_index.json` names.

## Usage

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True).to("cuda")
image = pipe("a photo of a mountain range at twilight"{size}).images[0]
```

`trust_remote_code=True` runs this repository's pipeline code on your machine: read it first, and pin a reviewed
version with `revision="<commit>"`. The perceptual loss is LPIPS-VGG from the `lpips` package (`pip install lpips`);
it downloads torchvision's VGG-16 weights on first use.

## Parameters

{parameters}

## Citation

```bibtex
{citation}
```
"""


def model_repo_card(repo_id: str, base_model: str | None = None, pipeline_class=None) -> str:
    """`README.md` of a ready-to-use model repo of `pipeline_class` (default `SyncDiffusionPipeline`): usage in two
    lines, its parameters, citation; `base_model` in the metadata if it is a Hub id."""
    pipeline_class = _default_class() if pipeline_class is None else pipeline_class
    family = _family(pipeline_class)
    is_hub_id = base_model is not None and not os.path.exists(base_model) and base_model.count("/") == 1
    weights = f"[{base_model}](https://huggingface.co/{base_model})'s weights" if is_hub_id else family["kind"]
    size = _call_size(pipeline_class)
    if "controlnet" in family:
        size = ', image=load_image("depth_512x2048.png")'  # the condition, as large as the panorama
    fields = {
        "base_model": f"base_model: {base_model}\n" if is_hub_id else "",
        "tags": _tags(family),
        "name": repo_id.split("/")[-1],
        "weights": weights + (", under that model's license," if is_hub_id else ""),
        "class_name": pipeline_class.__name__,
        "repo_id": repo_id,
        "size": size,
        "parameters": _parameters_table(pipeline_class),
        "citation": _CITATION,
    }
    card = _fill(_MODEL_REPO_CARD, fields)
    if "controlnet" in family:
        card = card.replace(
            "from diffusers import DiffusionPipeline\n",
            "from diffusers import DiffusionPipeline\nfrom diffusers.utils import load_image\n",
        )
    if "dtype" in family:  # FLUX.1: 12 billion parameters, bfloat16 (float16 overflows)
        card = card.replace(
            "from diffusers import DiffusionPipeline\n", "import torch\nfrom diffusers import DiffusionPipeline\n"
        )
        card = card.replace(
            f'from_pretrained("{repo_id}", trust_remote_code=True)',
            f'from_pretrained("{repo_id}", trust_remote_code=True, torch_dtype=torch.{family["dtype"]})',
        )
    return card


def model_card(repo_id: str, pipeline_class=None) -> str:
    """The custom-pipeline repository's `README.md` for `pipeline_class` (default `SyncDiffusionPipeline`): metadata,
    what the pipeline is, usage with `repo_id`, its parameters (from its `__call__`), citation."""
    pipeline_class = _default_class() if pipeline_class is None else pipeline_class
    family = _family(pipeline_class)
    if "controlnet" in family:
        usage = _CUSTOM_CONTROLNET_USAGE
    else:
        usage = _CUSTOM_FLUX_USAGE if family.get("dtype") == "bfloat16" else _CUSTOM_USAGE
    usage = _fill(
        usage,
        {
            "base_model": family["base_model"],
            "controlnet": family.get("controlnet", ""),
            "repo_id": repo_id,
            "size": _call_size(pipeline_class),
            "call": _panorama_call(pipeline_class, family),
        },
    )
    fields = {
        "tags": _tags(family),
        "class_name": pipeline_class.__name__,
        "about": family["about"],
        "weights": family["weights"],
        "usage": usage,
        "besides": family["besides"],
        "defaults": _call_defaults_text(pipeline_class),
        "parameters": _parameters_table(pipeline_class),
        "citation": _CITATION,
    }
    return _fill(_MODEL_CARD, fields)


def _check_repo_id(repo_id):
    message = f"Invalid repo id {repo_id!r}: expected `namespace/name`, e.g. `your-name/syncdiffusion`."
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(message)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{message} {err}") from None


def publish(
    repo_id: str,
    *,
    pipeline_class=None,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload SyncDiffusion custom pipeline",
    api=None,
) -> str:
    """Upload a pipeline's file as `pipeline.py` with its model card `README.md` to the Hub model repo `repo_id`.

    The repository is created if needed; both files go in one commit.

    Args:
        repo_id (`str`):
            The target repository, `namespace/name`.
        pipeline_class (*optional*):
            `SyncDiffusionPipeline` (the default), `SyncDiffusionXLPipeline`, `SyncDiffusionControlNetPipeline`,
            `SyncDiffusionFluxPipeline`, `SyncDiffusionFlux2KleinPipeline`, `SyncDiffusionZImagePipeline` or a
            subclass: its source file is uploaded and its `__call__` makes the card's parameter table.
        token (`str`, *optional*):
            A Hub token with write access; defaults to the saved login or `HF_TOKEN`.
        private (`bool`, defaults to `False`):
            Whether a newly created repository is private. An existing repository keeps its visibility.
        commit_message (`str`):
            The commit message.
        api ([`~huggingface_hub.HfApi`], *optional*):
            The client to use (tests pass a fake one).

    Returns:
        `str`: the URL of the commit.
    """
    _check_repo_id(repo_id)
    pipeline_class = _default_class() if pipeline_class is None else pipeline_class
    card = model_card(repo_id, pipeline_class)  # raises for a class that is not a SyncDiffusion pipeline
    api = api if api is not None else HfApi()
    operations = [
        CommitOperationAdd(
            path_in_repo=PIPELINE_FILENAME, path_or_fileobj=pipeline_source(pipeline_class).encode("utf-8")
        ),
        CommitOperationAdd(path_in_repo=MODEL_CARD_FILENAME, path_or_fileobj=card.encode("utf-8")),
    ]
    try:
        api.create_repo(repo_id, exist_ok=True, private=private, token=token)
        info = api.create_commit(repo_id, operations, commit_message=commit_message, token=token)
    except HfHubHTTPError as err:
        _explain_auth_error(err, repo_id)
        raise
    return str(info.commit_url)


def _explain_auth_error(err, repo_id):
    """Add how to log in to a 401/403 from the Hub."""
    if getattr(err.response, "status_code", None) in (401, 403):
        err.append_to_message(
            f"\n\nCould not write to {repo_id!r} on the Hub: authentication failed, or the token cannot write"
            " there. Run `hf auth login` with a write token, pass `token=`, or set `HF_TOKEN`."
        )


def export(pipe, folder, base_model: str | None = None, repo_id: str | None = None) -> str:
    """Save `pipe` to `folder` as a model that loads itself (weights, its class's source file as `syncdiffusion.py`,
    `syncdiffusion_xl.py`, `syncdiffusion_controlnet.py`, `syncdiffusion_flux.py`, `syncdiffusion_flux2.py` or
    `syncdiffusion_z_image.py`, `model_index.json`) with its model card `README.md` (`repo_id` in the usage; default:
    the folder's name)."""
    name = os.path.basename(os.path.abspath(folder)) if repo_id is None else repo_id
    card = model_repo_card(name, base_model, type(pipe))  # raises for a class that is not a SyncDiffusion pipeline
    pipe.save_pretrained(folder)
    with open(os.path.join(folder, MODEL_CARD_FILENAME), "w", encoding="utf-8") as f:
        f.write(card)
    return str(folder)


def publish_model(
    pipe,
    repo_id: str,
    *,
    base_model: str | None = None,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload SyncDiffusion pipeline with weights",
    api=None,
) -> str:
    """Upload `pipe` as a ready-to-use model repo `repo_id`: what `export` writes, in one commit.

    `DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)` then loads it. Arguments as in `publish`;
    `base_model` (the Hub id the weights come from) goes into the model card.

    Returns:
        `str`: the URL of the commit.
    """
    _check_repo_id(repo_id)
    api = api if api is not None else HfApi()
    with tempfile.TemporaryDirectory(prefix="syncdiffusion-export-") as folder:
        export(pipe, folder, base_model=base_model, repo_id=repo_id)
        try:
            api.create_repo(repo_id, exist_ok=True, private=private, token=token)
            info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, token=token)
        except HfHubHTTPError as err:
            _explain_auth_error(err, repo_id)
            raise
    return str(getattr(info, "commit_url", info))
