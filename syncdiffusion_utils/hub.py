"""Publish `SyncDiffusionPipeline` to the Hugging Face Hub, as a custom pipeline or as a ready-to-use model.

`publish(repo_id)` uploads the pipeline file as `pipeline.py` and a model card as `README.md`, so that

    DiffusionPipeline.from_pretrained(model, custom_pipeline=repo_id, trust_remote_code=True)

loads it. `publish_model(pipe, repo_id)` uploads a whole pipeline (weights, `syncdiffusion.py`, model card), so that

    DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)

loads it; `export(pipe, folder)` writes the same files to a local folder.
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

_MODEL_CARD = """\
---
library_name: diffusers
license: apache-2.0
pipeline_tag: text-to-image
tags:
- diffusers
- text-to-image
- panorama
- stable-diffusion
- syncdiffusion
---

# SyncDiffusion custom pipeline

`SyncDiffusionPipeline` generates coherent panoramas with [SyncDiffusion](https://huggingface.co/papers/2306.05178)
(Lee et al., NeurIPS 2023, arXiv:2306.05178). Like MultiDiffusion it denoises overlapping windows ("views") of a wide
latent and averages them; during the first steps it also moves every view down the gradient of the LPIPS distance
between its predicted image and an anchor view's, so that all windows agree on one scene instead of blending
different ones.

It is a drop-in replacement for diffusers' deprecated `StableDiffusionPanoramaPipeline`: the same components and
`__call__` arguments, with that pipeline's bugs fixed. With `sync_weight=0` it is MultiDiffusion.

This repository holds only the pipeline code (`pipeline.py`); the weights come from any Stable Diffusion checkpoint.

## Usage

```bash
pip install diffusers transformers torch lpips
```

```python
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained(
    "stabilityai/stable-diffusion-2-base",
    custom_pipeline="{repo_id}",
    trust_remote_code=True,
    torch_dtype=torch.float16,
)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe = pipe.to("cuda")

image = pipe("a photo of a mountain range at twilight", height=512, width=2048).images[0]
image.save("panorama.png")
```

`trust_remote_code=True` runs this repository's `pipeline.py` on your machine: read it first, and pin a reviewed
version with `custom_revision="<commit>"`. The perceptual loss is LPIPS-VGG from the `lpips` package, imported on the
first synchronized call; `pipe.set_perceptual_loss(module)` replaces it.

## Parameters

Besides every argument of `StableDiffusionPanoramaPipeline` (same defaults: `height=512`, `width=2048`,
`num_inference_steps=50`, `guidance_scale=7.5`, `view_batch_size=1`, `circular_padding=False`, ...):

{parameters}

## Citation

```bibtex
{citation}
```
"""


def pipeline_source() -> str:
    """The text of the installed `pipeline_syncdiffusion.py`, line endings untouched."""
    import pipeline_syncdiffusion

    with open(pipeline_syncdiffusion.__file__, encoding="utf-8", newline="") as f:
        return f.read()


def _sync_parameters() -> list[tuple[str, object, str]]:
    """`(name, default, description)` of `stride` and every `sync_*` argument of `SyncDiffusionPipeline.__call__`.

    Read from its signature and its docstring, so the model card always matches the uploaded file.
    """
    from pipeline_syncdiffusion import SyncDiffusionPipeline

    doc = SyncDiffusionPipeline.__call__.__doc__ or ""
    parameters = []
    for name, parameter in inspect.signature(SyncDiffusionPipeline.__call__).parameters.items():
        if name != "stride" and not name.startswith("sync_"):
            continue
        # An argument is documented as `name (type):` followed by lines indented deeper than that header.
        match = re.search(rf"^( *){name} \(.*\):\n((?:\1 +\S.*\n?)+)", doc, re.M)
        description = " ".join(match.group(2).split()) if match else ""
        description = re.sub(r"\[`~?(?:[\w.]+\.)?(\w+)`\]", r"`\1`", description)  # [`~a.B`] -> `B`
        parameters.append((name, parameter.default, description))
    return parameters


def _parameters_table() -> str:
    rows = ["| Parameter | Default | Meaning |", "|---|---|---|"]
    for name, default, description in _sync_parameters():
        shown = f'"{default}"' if isinstance(default, str) else repr(default)
        rows.append(f"| `{name}` | `{shown}` | {description.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


_MODEL_REPO_CARD = """\
---
library_name: diffusers
pipeline_tag: text-to-image
{base_model}tags:
- diffusers
- text-to-image
- panorama
- stable-diffusion
- syncdiffusion
---

# {name}: SyncDiffusion panoramas

{weights} with the [SyncDiffusion](https://huggingface.co/papers/2306.05178) pipeline (Lee et al., NeurIPS 2023):
coherent panoramas from overlapping windows that are synchronized by an LPIPS gradient. The repository holds the
weights and the pipeline code, `syncdiffusion.py`, which `model_index.json` names.

## Usage

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True).to("cuda")
image = pipe("a photo of a mountain range at twilight", height=512, width=2048).images[0]
```

`trust_remote_code=True` runs this repository's `syncdiffusion.py` on your machine: read it first, and pin a reviewed
version with `revision="<commit>"`. The perceptual loss is LPIPS-VGG from the `lpips` package (`pip install lpips`);
it downloads torchvision's VGG-16 weights on first use.

## Parameters

{parameters}

## Citation

```bibtex
{citation}
```
"""


def model_repo_card(repo_id: str, base_model: str | None = None) -> str:
    """`README.md` of a ready-to-use model repo: usage in two lines, parameters, citation; `base_model` if a Hub id."""
    is_hub_id = base_model is not None and not os.path.exists(base_model) and base_model.count("/") == 1
    weights = (
        f"[{base_model}](https://huggingface.co/{base_model})'s weights" if is_hub_id else "Stable Diffusion weights"
    )
    fields = {
        "{base_model}": f"base_model: {base_model}\n" if is_hub_id else "",
        "{name}": repo_id.split("/")[-1],
        "{weights}": weights + (", under that model's license," if is_hub_id else ""),
        "{repo_id}": repo_id,
        "{parameters}": _parameters_table(),
        "{citation}": _CITATION,
    }
    card = _MODEL_REPO_CARD
    for field, value in fields.items():
        card = card.replace(field, value)
    return card


def model_card(repo_id: str) -> str:
    """The Hub repository's `README.md`: metadata, what the pipeline is, usage with `repo_id`, parameters, citation."""
    card = _MODEL_CARD.replace("{parameters}", _parameters_table()).replace("{citation}", _CITATION)
    return card.replace("{repo_id}", repo_id)


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
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload SyncDiffusion custom pipeline",
    api=None,
) -> str:
    """Upload the pipeline as `pipeline.py` with its model card `README.md` to the Hub model repo `repo_id`.

    The repository is created if needed; both files go in one commit.

    Args:
        repo_id (`str`):
            The target repository, `namespace/name`.
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
    api = api if api is not None else HfApi()
    operations = [
        CommitOperationAdd(path_in_repo=PIPELINE_FILENAME, path_or_fileobj=pipeline_source().encode("utf-8")),
        CommitOperationAdd(path_in_repo=MODEL_CARD_FILENAME, path_or_fileobj=model_card(repo_id).encode("utf-8")),
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
    """Save `pipe` to `folder` as a model that loads itself (weights, `syncdiffusion.py`, `model_index.json`)
    with its model card `README.md` (`repo_id` in the usage; default: the folder's name)."""
    pipe.save_pretrained(folder)
    card = model_repo_card(repo_id or os.path.basename(os.path.abspath(folder)), base_model)
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
