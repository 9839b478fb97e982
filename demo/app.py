"""SyncDiffusion panoramas as a Hugging Face Space: the app of `syncdiffusion demo`, from the same code.

Settings are environment variables (on a Space: Settings, Variables): SYNCDIFFUSION_MODEL, a Hub id or a folder of
an SD, SDXL, FLUX.1, FLUX.2 [klein] or Z-Image model (default stabilityai/stable-diffusion-2-base; `tiny`,
`tiny-xl`, `tiny-flux`, `tiny-flux2` and `tiny-z-image` run offline random tiny models, to try the page anywhere). The
model is loaded once, in half precision on a GPU (bfloat16 for the transformers).
From a checkout: `python demo/app.py` (http://127.0.0.1:7860).
"""

import os
import sys


HERE = os.path.dirname(os.path.abspath(__file__))
if not os.path.exists(os.path.join(HERE, "pipeline_syncdiffusion.py")):  # run from a checkout: use the repository's
    sys.path.insert(0, os.path.dirname(HERE))

from syncdiffusion_utils.demo import build_app, launch  # noqa: E402
from syncdiffusion_utils.loading import DEFAULT_MODEL, load_pipeline, resolve_device  # noqa: E402


MODEL = os.environ.get("SYNCDIFFUSION_MODEL", DEFAULT_MODEL)

pipe = load_pipeline(MODEL, fp16=resolve_device() == "cuda", progress=False)
demo = build_app(pipe, MODEL)

if __name__ == "__main__":
    launch(demo)  # a Space sets GRADIO_SERVER_NAME=0.0.0.0; elsewhere gradio serves on 127.0.0.1
