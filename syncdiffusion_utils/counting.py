"""Count the passes a panorama pipeline's call makes: denoiser (UNet, ControlNet, FLUX transformer), VAE decoder,
LPIPS; forward and backward.

SyncDiffusion's cost is in passes, so they are counted, not guessed::

    from syncdiffusion_utils.counting import PassCounter

    with PassCounter(pipe, sync_decoder=tiny_decoder) as counter:
        pipe(prompt, sync_decoder=tiny_decoder, ...)
    print(counter.as_dict())   # {"unet_fwd": 9, "unet_bwd": 4, ...}

Units: **view-passes**. A view-pass is one view's guided prediction (or its backward). A call on a batch of `k`
views counts `k`; with classifier-free guidance the UNet sees every view twice (`[uncond, cond]`) and that doubled
batch counts once; with FLUX's true CFG (`true_cfg_scale > 1` and a negative prompt) the transformer runs twice per
view, positive and negative, and each of the two calls counts half, so a guided view is one view-pass as without
true CFG (its cost per view-pass is then two transformer calls). With several images per call (several prompts,
`num_images_per_prompt`) each view appears once per image and is still counted once, i.e. counts are divided by the
number of images, so they depend neither on `view_batch_size` nor on the image batch. The number of images is read
from the call itself (the batch size given to `prepare_latents`) unless `num_images` is passed.

What is counted, with hooks only (nothing in the pipeline changes; everything is removed on exit):

- `unet_fwd`: calls of `pipe.unet`, plus the forwards that activation checkpointing re-runs during the backward
  (`unet_recompute`, included in `unet_fwd` because it is real cost): a backward of the UNet in which any of its
  submodules ran forward again counts one recomputed forward per view, even though the (small) layers that
  diffusers does not checkpoint, like `conv_in`, are not re-run.
- `unet_bwd`: backward passes through `pipe.unet` (a full backward hook; the batch of the gradient).
- `transformer_fwd`, `transformer_recompute`, `transformer_bwd`: the same for `pipe.transformer` (FLUX.1's,
  FLUX.2 [klein]'s and Z-Image's SyncDiffusion pipelines; diffusers' `FluxPipeline`, `Flux2KleinPipeline`,
  `ZImagePipeline`). FLUX's transformers take their inputs as keywords, so torch fires their backward hook when the
  gradient reaches the output, before the blocks are recomputed; a submodule that runs outside the transformer's own
  forward is then a recomputation of the last backward (a submodule running a second time starts the next one's).
  Z-Image's returns a list of images, which torch's module backward hooks never see: a module whose output holds no
  tensor at its top level gets a hook on each tensor of its output instead, the first gradient to reach one of them
  counting its backward (with the forward's batch), recomputation as for keyword inputs. A list of tensors as the
  input (`ZImagePipeline`'s one latent per image) counts its length as the batch.
- The denoisers are `pipe.unet` and `pipe.transformer`, whichever the pipeline has (`pipe.denoiser` is one of them).
- `controlnet_fwd`, `controlnet_bwd`, `controlnet_recompute`: the same for `pipe.controlnet` when the pipeline has
  one (`SyncDiffusionControlNetPipeline`; a `MultiControlNetModel` counts once per call, like one model). With
  guidance it sees every view twice, as the UNet does, except in `guess_mode` (conditional rows only): either way
  one view counts one.
- `vae_dec_fwd`, `vae_dec_bwd`, `vae_dec_recompute`: `pipe.vae.decoder` while it makes images for the
  synchronization loss (inside `pipe.decode_for_sync`); recomputation included in `vae_dec_fwd` as for the UNet.
- `final_decode`: every other `pipe.vae.decoder` call, i.e. the decode of the finished panorama (once per image,
  whatever its width). It is not a view-pass and is not in `vae_dec_fwd`.
- `sync_dec_fwd`, `sync_dec_bwd`, `sync_dec_recompute`: the same for the `sync_decoder` passed to the counter
  (its `.decoder` submodule when it has one, e.g. `AutoencoderTiny`). If it is `pipe.vae` itself, its passes are
  in the `vae_dec_*` counts.
- `dec_fwd`, `dec_bwd`: the loss decoder whichever it is, `vae_dec_* + sync_dec_*`.
- `lpips_fwd`, `lpips_bwd`: the perceptual loss module (`pipe._perceptual_loss`, or the one the pipeline creates
  on first use), counted by its first input's batch; `lpips_sizes` holds the image sizes `(height, width)` it saw.

A module's forward is counted once per outermost call, even if the same module is re-entered inside it.

What the algorithm should make, in the same keys: `expected_sync_step` (a synchronized step) and
`expected_plain_step` (a MultiDiffusion step); with region prompts a view's denoiser passes are made once per prompt
present in it, which `prompts_per_view` gives from the masks and the views.
"""

import time
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F


COUNT_KEYS = (
    "unet_fwd",
    "unet_recompute",
    "unet_bwd",
    "transformer_fwd",
    "transformer_recompute",
    "transformer_bwd",
    "controlnet_fwd",
    "controlnet_recompute",
    "controlnet_bwd",
    "vae_dec_fwd",
    "vae_dec_recompute",
    "vae_dec_bwd",
    "final_decode",
    "sync_dec_fwd",
    "sync_dec_recompute",
    "sync_dec_bwd",
    "lpips_fwd",
    "lpips_bwd",
)
DERIVED_KEYS = ("dec_fwd", "dec_bwd")
DENOISERS = ("unet", "transformer")


def _batch(value):
    """The batch of the first tensors found in `value` (a tensor, or a tuple/list/dict of them): a tensor's leading
    dimension, or the length of a list of tensors, one per image (as `ZImagePipeline` passes its transformer)."""
    if isinstance(value, torch.Tensor):
        return value.shape[0] if value.ndim > 0 else None
    if isinstance(value, list) and value and all(isinstance(item, torch.Tensor) for item in value):
        return len(value)
    if isinstance(value, dict):
        value = tuple(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            batch = _batch(item)
            if batch is not None:
                return batch
    return None


def _tensors(value):
    """Every tensor in `value`: a tensor, or nested in tuples, lists and dicts (diffusers' outputs are dicts)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [tensor for item in value for tensor in _tensors(item)]
    return []


def _hooked_by_torch(output):
    """Whether torch's full backward hooks see `output`: it is a tensor or a tuple holding tensors at its top level
    (torch's `BackwardHook` wraps only those; a list of images, as Z-Image's transformer returns, it does not)."""
    items = output if isinstance(output, tuple) else (output,)
    return any(isinstance(item, torch.Tensor) for item in items)


def _number(value):
    """A `Fraction` as an `int` when whole, else a `float`."""
    return int(value) if value.denominator == 1 else float(value)


class _TrackedModule:
    """Forward, backward and recomputation hooks on one module; calls back into the counter with the batch."""

    def __init__(self, counter, module, on_forward, on_backward, on_recompute, track_recompute):
        self.counter = counter
        self.guided = None  # whether the last outermost forward had guidance rows; its backward is counted alike
        self.module = module
        self.on_forward = on_forward
        self.on_backward = on_backward
        self.on_recompute = on_recompute
        self.depth = 0  # nesting of forward calls of this very module
        self.in_backward = 0  # >0 between the module's backward pre-hook and its backward hook
        self.recomputed = False
        # Backwards whose hook fired before their recomputation (inputs passed as keywords): their batches, and the
        # submodules re-run so far in the recomputation being counted.
        self.awaiting_recompute = []
        self.recomputing = None
        self.forward_batch = None  # the batch of the outermost forward running or last run
        self.handles = [
            module.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            module.register_forward_hook(self._post_forward),
            module.register_full_backward_pre_hook(self._pre_backward),
            module.register_full_backward_hook(self._post_backward),
        ]
        if track_recompute:
            # Activation checkpointing re-runs submodules (not the module itself) inside its backward.
            for sub in module.modules():
                if sub is not module:
                    self.handles.append(sub.register_forward_pre_hook(self._sub_forward))

    def _pre_forward(self, module, args, kwargs):
        self.depth += 1
        if self.depth == 1:
            # a new forward: every earlier backward has finished, recomputation included
            self.awaiting_recompute, self.recomputing = [], None
            self.forward_batch = _batch(args) or _batch(kwargs)
            self.on_forward(self.forward_batch, args, kwargs)

    def _post_forward(self, module, args, output):
        self.depth -= 1
        if self.depth == 0 and torch.is_grad_enabled() and not _hooked_by_torch(output):
            self._hook_nested_output(output)

    def _hook_nested_output(self, output):
        """
        Count the backward of a forward whose output torch's full backward hooks do not see (a list or dict of
        tensors, `_hooked_by_torch`): a hook on each of its tensors that needs a gradient, the first one the gradient
        reaches starting the backward, counted with the forward's batch. The gradient reaches the output before the
        blocks are recomputed, so the recomputation is counted after it, as for a forward with keyword inputs.
        """
        tensors = [tensor for tensor in _tensors(output) if tensor.requires_grad]
        if not tensors:
            return
        batch, reached = self.forward_batch, set()

        def on_gradient(index):
            def hook(grad):
                if index in reached:  # a second backward through the same forward
                    reached.clear()
                if not reached:
                    self.on_backward(batch)
                    self.awaiting_recompute.append(batch)
                    self.recomputing = None
                reached.add(index)

            return hook

        self.handles.extend(tensor.register_hook(on_gradient(k)) for k, tensor in enumerate(tensors))

    def _sub_forward(self, module, args):
        if self.depth:  # inside the module's own forward
            return
        if self.in_backward:
            self.recomputed = True
        elif self.recomputing is None or module in self.recomputing:
            # outside the module's forward and its backward's hooks: the recomputation of a backward whose hook has
            # fired already; a submodule re-running starts the next backward's
            if self.awaiting_recompute:
                self.on_recompute(self.awaiting_recompute.pop())
                self.recomputing = {module}
        else:
            self.recomputing.add(module)

    def _pre_backward(self, module, grad_output):
        self.in_backward += 1
        self.recomputed = False
        self.pending_batch = _batch(grad_output)

    def _post_backward(self, module, grad_input, grad_output):
        self.in_backward = max(0, self.in_backward - 1)
        batch = _batch(grad_output) or getattr(self, "pending_batch", None) or _batch(grad_input)
        self.on_backward(batch)
        if self.recomputed:
            self.on_recompute(batch)
            self.recomputed = False
        else:
            self.awaiting_recompute.append(batch)
            self.recomputing = None

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []


class PassCounter:
    """
    Context manager counting a pipeline's denoiser, VAE-decoder and LPIPS passes in view-passes (see the module doc).

    Args:
        pipe: a SyncDiffusion pipeline (anything with a `unet` or a `transformer`, and a `vae`, works: diffusers'
            own pipelines too; `decode_for_sync` and `_perceptual_loss` where it synchronizes).
        sync_decoder: the `sync_decoder` given to the calls being counted, if any; counted as `sync_dec_*`.
        num_images: images per call (prompts × `num_images_per_prompt`); by default read from each call.
        track_recompute: also count the forwards that activation checkpointing recomputes in the backward
            (a pre-hook on every submodule of the denoisers and the decoders; cheap).
        guided: whether the denoiser sees every view twice (classifier-free guidance; FLUX's true CFG). By default
            read from the pipeline during the call: for a transformer the call's true CFG (`_true_cfg`, which the
            SyncDiffusion pipelines set), else `do_classifier_free_guidance` (a UNet's; diffusers'
            `Flux2KleinPipeline` and `ZImagePipeline`, whose `cfg_truncation` steps it does not see). Pass it for a
            pipeline that does not say, such as diffusers' `FluxPipeline` with true CFG.

    Read the counts with attribute access (`counter.unet_fwd`), `counter.as_dict()`, or `counter.snapshot()`
    (also usable while the pipeline runs, e.g. from `callback_on_step_end`, to count per step).
    `counter.reset()` zeroes them.
    """

    def __init__(self, pipe, sync_decoder=None, num_images=None, track_recompute=True, guided=None):
        if not any(getattr(pipe, name, None) is not None for name in DENOISERS):
            raise ValueError(f"pipe={type(pipe).__name__}: a pipeline with a `unet` or a `transformer` to count")
        self.pipe = pipe
        self.sync_decoder = sync_decoder
        self.fixed_num_images = num_images
        self.track_recompute = track_recompute
        self.fixed_guided = guided
        self._tracked = []
        self._patched = {}
        self._in_sync_decode = 0
        self._call_num_images = None
        self._lpips_module = None
        self.reset()

    # -- counts ------------------------------------------------------------------------------------------------

    def reset(self):
        """Zero every count."""
        self._counts = {key: Fraction(0) for key in COUNT_KEYS}
        self.lpips_sizes = set()

    def snapshot(self):
        """The counts now, as a dict of numbers (ints when whole), derived totals included."""
        counts = dict(self._counts)
        counts["dec_fwd"] = counts["vae_dec_fwd"] + counts["sync_dec_fwd"]
        counts["dec_bwd"] = counts["vae_dec_bwd"] + counts["sync_dec_bwd"]
        return {key: _number(value) for key, value in counts.items()}

    def as_dict(self):
        """`snapshot()` plus `lpips_sizes`, a sorted list of `[height, width]`."""
        result = self.snapshot()
        result["lpips_sizes"] = sorted([list(size) for size in self.lpips_sizes])
        return result

    def __getattr__(self, name):
        if name in COUNT_KEYS or name in DERIVED_KEYS:
            return self.snapshot()[name]
        raise AttributeError(name)

    def __repr__(self):
        counts = ", ".join(f"{key}={value}" for key, value in self.snapshot().items() if value)
        return f"PassCounter({counts or 'nothing counted'})"

    @staticmethod
    def difference(after, before):
        """`after - before` for two `snapshot()` dicts."""
        return {key: after[key] - before.get(key, 0) for key in after}

    # -- units -------------------------------------------------------------------------------------------------

    def _num_images(self):
        return self.fixed_num_images or self._call_num_images or 1

    def _guided(self, denoiser="unet"):
        """Whether `denoiser` sees every view twice in the current call."""
        if self.fixed_guided is not None:
            return bool(self.fixed_guided)
        try:
            if denoiser == "transformer" and hasattr(self.pipe, "_true_cfg"):
                # FLUX guides by an embedding; only true CFG runs the transformer twice (the SyncDiffusion pipelines
                # set it at call time, Z-Image's at each step).
                return bool(self.pipe._true_cfg)
            # `do_classifier_free_guidance` reads `_guidance_scale`, which the pipeline sets at call time (a UNet's;
            # diffusers' Flux2KleinPipeline and ZImagePipeline guide every view twice; FluxPipeline, without it,
            # does not say).
            return bool(self.pipe.do_classifier_free_guidance)
        except (AttributeError, TypeError):
            return False

    def _add(self, key, batch, guided=False):
        if batch is None:
            return
        per_view = self._num_images() * (2 if guided else 1)
        self._counts[key] += Fraction(batch, per_view)

    # -- hooks -------------------------------------------------------------------------------------------------

    def _track(self, module, fwd, bwd, recompute, guidance=None, forward_key=None, track_recompute=None):
        """Hook `module`. `guidance`: a function of the forward's `kwargs` saying whether this pass sees every view
        twice (the ControlNet's `guess_mode` drops a row); `None` for never."""

        def on_forward(batch, args, kwargs):
            tracked.guided = guidance is not None and bool(guidance(kwargs))
            self._add(forward_key(args) if forward_key else fwd, batch, tracked.guided)

        def on_backward(batch):
            self._add(bwd, batch, tracked.guided)

        def on_recompute(batch):
            # a recomputed forward is a forward: it goes in both the forward count and its own count
            self._add(recompute, batch, tracked.guided)
            self._add(fwd, batch, tracked.guided)

        tracked = _TrackedModule(
            self,
            module,
            on_forward,
            on_backward,
            on_recompute,
            self.track_recompute if track_recompute is None else track_recompute,
        )
        self._tracked.append(tracked)
        return tracked

    def _patch(self, name, wrapper_factory):
        """Shadow the pipeline method `name` with an instance attribute for the counter's lifetime."""
        original = getattr(self.pipe, name, None)
        if original is None:
            return
        self._patched[name] = self.pipe.__dict__.get(name, _MISSING)
        object.__setattr__(self.pipe, name, wrapper_factory(original))

    def __enter__(self):
        pipe = self.pipe
        for name in DENOISERS:
            if getattr(pipe, name, None) is not None:
                self._track(
                    getattr(pipe, name),
                    f"{name}_fwd",
                    f"{name}_bwd",
                    f"{name}_recompute",
                    guidance=lambda kwargs, name=name: self._guided(name),
                )
        if getattr(pipe, "controlnet", None) is not None:
            self._track(
                pipe.controlnet,
                "controlnet_fwd",
                "controlnet_bwd",
                "controlnet_recompute",
                guidance=lambda kwargs: self._guided() and not kwargs.get("guess_mode", False),
            )

        vae_decoder = getattr(pipe.vae, "decoder", pipe.vae)
        self._track(
            vae_decoder,
            "vae_dec_fwd",
            "vae_dec_bwd",
            "vae_dec_recompute",
            forward_key=lambda args: "vae_dec_fwd" if self._in_sync_decode else "final_decode",
        )
        if self.sync_decoder is not None:
            sync_module = getattr(self.sync_decoder, "decoder", self.sync_decoder)
            if sync_module is not vae_decoder and self.sync_decoder is not pipe.vae:
                self._track(sync_module, "sync_dec_fwd", "sync_dec_bwd", "sync_dec_recompute")

        if getattr(pipe, "_perceptual_loss", None) is not None:
            self._track_lpips(pipe._perceptual_loss)
        else:
            # The default LPIPS is built on first synchronized call: hook it when the pipeline hands it out.
            def wrap_perceptual_loss(original):
                def perceptual_loss(*args, **kwargs):
                    module = original(*args, **kwargs)
                    if module is not self._lpips_module:
                        self._track_lpips(module)
                    return module

                return perceptual_loss

            self._patch("perceptual_loss", wrap_perceptual_loss)

        def wrap_decode_for_sync(original):
            def decode_for_sync(*args, **kwargs):
                self._in_sync_decode += 1
                try:
                    return original(*args, **kwargs)
                finally:
                    self._in_sync_decode -= 1

            return decode_for_sync

        def wrap_prepare_latents(original):
            def prepare_latents(*args, **kwargs):
                batch = args[0] if args else kwargs.get("batch_size")
                if isinstance(batch, int):
                    self._call_num_images = batch
                return original(*args, **kwargs)

            return prepare_latents

        self._patch("decode_for_sync", wrap_decode_for_sync)
        self._patch("prepare_latents", wrap_prepare_latents)
        return self

    def _track_lpips(self, module):
        self._lpips_module = module
        tracked = self._track(module, "lpips_fwd", "lpips_bwd", None, track_recompute=False)
        tracked.handles.append(module.register_forward_pre_hook(self._lpips_size))

    def _lpips_size(self, module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4:
            self.lpips_sizes.add(tuple(args[0].shape[-2:]))

    def __exit__(self, *exc):
        for tracked in self._tracked:
            tracked.remove()
        self._tracked = []
        for name, previous in self._patched.items():
            if previous is _MISSING:
                self.pipe.__dict__.pop(name, None)
            else:
                object.__setattr__(self.pipe, name, previous)
        self._patched = {}
        return False


_MISSING = object()


GRADIENTS = ("unet", "transformer", "x0")


def _denoiser_counts(denoiser, fwd, recompute, bwd):
    """The denoisers' keys: `denoiser`'s with these counts, the other denoisers' zero."""
    if denoiser not in DENOISERS:
        raise ValueError(f"denoiser={denoiser!r}: expected one of {', '.join(DENOISERS)}")
    counts = {}
    for name in DENOISERS:
        scale = 1 if name == denoiser else 0
        counts[f"{name}_fwd"] = fwd * scale
        counts[f"{name}_recompute"] = recompute * scale
        counts[f"{name}_bwd"] = bwd * scale
    return counts


def expected_sync_step(
    num_views,
    gradient="unet",
    reuse_noise=False,
    checkpointing=False,
    tiny_decoder=False,
    controlnet=False,
    denoiser="unet",
    view_prompts=None,
):
    """
    View-passes of one synchronized step with `num_views` views, in `PassCounter`'s keys, for the pipeline's
    algorithm: the anchor's guided forward and decode without gradient; for each of the other
    `N - 1` views a gradient pass (denoiser forward, decoder forward, LPIPS, and their backwards) and, unless the
    noise is reused, a second denoiser forward.
    With region prompts, `view_prompts` is the number of prompts present in each view (`prompts_per_view`; the
    anchor is view `N // 2`, the pipeline's): a view's denoiser passes (forward, backward, recomputation; the
    ControlNet's too) are made once per prompt present, while its decoder and LPIPS passes stay one per view (the
    loss image is decoded from the mask-weighted mean of its prompts' clean latents). `gradient` is `"x0"` or goes through the denoiser (`"unet"` or
    `"transformer"`, the pipelines' own names; either counts alike). With `checkpointing` the backwards recompute the
    denoiser (only when the gradient goes through it) and the decoder (the VAE's, or a `sync_decoder` such as a tiny
    one: it must support checkpointing, so `tiny_decoder` counts the same).
    With `controlnet` (a ControlNet that runs at this step) every UNet pass has a ControlNet pass before it, and the
    gradient goes back through it too, so its counts are the UNet's. `denoiser` is `"unet"` or `"transformer"`
    (FLUX, docs/flux.md: the same formulas, a view-pass being one view's guided velocity, true CFG included).

    Exact mode: `2N-1` denoiser forward, `N-1` denoiser backward, `N` decoder forward, `N-1` decoder backward, `N-1`
    LPIPS forward and backward (the paper's released code does `2N+1, N, N+1, N`).
    """
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient={gradient!r}: expected one of {', '.join(GRADIENTS)}")
    n = num_views
    others = n - 1
    prompts = _view_prompt_counts(view_prompts, n)
    anchor_prompts = prompts[n // 2]
    # the denoiser's passes of the other views, one per prompt present in each
    other_prompts = sum(prompts) - anchor_prompts
    through = gradient != "x0"
    recompute = other_prompts if checkpointing and through else 0
    dec_recompute = others if checkpointing else 0
    fwd = anchor_prompts + other_prompts + (0 if reuse_noise else other_prompts) + recompute
    bwd = other_prompts if through else 0
    counts = _denoiser_counts(denoiser, fwd, recompute, bwd)
    counts.update(
        {
            "controlnet_fwd": fwd if controlnet else 0,
            "controlnet_recompute": recompute if controlnet else 0,
            "controlnet_bwd": bwd if controlnet else 0,
            "dec_fwd": n + dec_recompute,
            "dec_bwd": others,
            "lpips_fwd": others,
            "lpips_bwd": others,
        }
    )
    return counts


def expected_plain_step(num_views, controlnet=False, denoiser="unet", view_prompts=None):
    """View-passes of one unsynchronized (MultiDiffusion) step: one guided forward of the denoiser (`"unet"` or
    `"transformer"`, and of the ControlNet) per view, or with region prompts one per prompt present in each view
    (`view_prompts`, as for `expected_sync_step`)."""
    fwd = sum(_view_prompt_counts(view_prompts, num_views))
    counts = _denoiser_counts(denoiser, fwd, 0, 0)
    counts.update(
        {
            "controlnet_fwd": fwd if controlnet else 0,
            "controlnet_recompute": 0,
            "controlnet_bwd": 0,
            "dec_fwd": 0,
            "dec_bwd": 0,
            "lpips_fwd": 0,
            "lpips_bwd": 0,
        }
    )
    return counts


def _view_prompt_counts(view_prompts, num_views):
    """`view_prompts` as a list of `num_views` positive ints; one prompt per view when it is None."""
    if view_prompts is None:
        return [1] * num_views
    counts = list(view_prompts)
    if len(counts) != num_views or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in counts):
        raise ValueError(
            f"view_prompts={view_prompts!r}: expected {num_views} positive integers (prompts present in each view)"
        )
    return counts


def _mask_tensor(mask, index):
    """`region_masks[index]` as a float32 `(height, width)` tensor: a PIL image (white = 1), an array or a tensor."""
    if hasattr(mask, "convert"):  # a PIL image, read as the pipelines read it
        mask = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    mask = torch.as_tensor(mask)
    while mask.ndim > 2 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"region_masks[{index}] has shape {tuple(mask.shape)}: expected one (height, width) mask")
    return mask.detach().to(device="cpu", dtype=torch.float32)


def region_latent_weights(region_masks, vae_scale_factor=8):
    """
    Every prompt's weight over the panorama latent, `(1 + regions, height, width)`, background first: each region's
    mask (pixels) averaged over the VAE's `vae_scale_factor`-pixel blocks, the background `max(1 - sum of the
    region masks, 0)` (MultiDiffusion's `region_based.py`).
    """
    if not region_masks:
        raise ValueError(f"region_masks={region_masks!r}: expected one mask per region prompt")
    masks = [_mask_tensor(mask, k) for k, mask in enumerate(region_masks)]
    shapes = {tuple(mask.shape) for mask in masks}
    if len(shapes) != 1:
        raise ValueError(f"region_masks have the shapes {sorted(shapes)}: expected one (height, width) for all")
    latent_masks = F.avg_pool2d(torch.stack(masks)[:, None], vae_scale_factor)[:, 0]
    background = (1 - latent_masks.sum(0, keepdim=True)).clamp_min(0)
    return torch.cat([background, latent_masks])


def prompts_per_view(region_masks, views, vae_scale_factor=8):
    """
    The number of prompts present in each of `views` (`(h_start, h_end, w_start, w_end)` in latents, as
    `pipe.get_views` gives them; circular ones wrap): the background, where its weight `max(1 - sum of the masks, 0)`
    is nonzero somewhere in the view, and each region whose mask (averaged to the latent) is. This is what a view
    costs in denoiser passes per step (`expected_plain_step`, `expected_sync_step`'s `view_prompts`); a region
    covering no latent pixel is present in no view.
    """
    weights = region_latent_weights(region_masks, vae_scale_factor)
    width = weights.shape[-1]
    counts = []
    for h_start, h_end, w_start, w_end in views:
        columns = torch.arange(w_start, w_end) % width
        crop = weights[:, h_start:h_end].index_select(2, columns)
        counts.append(int(crop.flatten(1).ne(0).any(1).sum()))
    return counts


class StepRecorder:
    """
    A `callback_on_step_end` that records, for every denoising step, its wall time, this process's CPU time and
    (given a `PassCounter`) its passes. Step 0 starts at the call's first denoiser forward (UNet or transformer), or
    ControlNet forward, which comes before it (forward pre-hooks); pass the recorder as
    `callback_on_step_end=recorder` and use it as a context manager around the call.
    """

    def __init__(self, pipe, counter=None, synchronize=None):
        self.pipe = pipe
        self.counter = counter
        self.synchronize = synchronize or (lambda: None)
        self.step_seconds = []
        self.step_cpu_seconds = []
        self.step_counts = []
        self._handles = []

    def __enter__(self):
        self.step_seconds, self.step_cpu_seconds, self.step_counts = [], [], []
        self._last_time = None
        self._last_cpu = None
        self._last_counts = None
        # prepend: run before a `PassCounter`'s hook, so that step 0 includes the first forward
        models = [getattr(self.pipe, name, None) for name in (*DENOISERS, "controlnet")]
        self._handles = [m.register_forward_pre_hook(self._start, prepend=True) for m in models if m is not None]
        return self

    def _start(self, module, args):
        if self._last_time is None:
            self.synchronize()
            self._last_time = time.perf_counter()
            self._last_cpu = time.process_time()
            self._last_counts = self.counter.snapshot() if self.counter is not None else None

    def __call__(self, pipe, step, timestep, callback_kwargs):
        self.synchronize()
        now, cpu = time.perf_counter(), time.process_time()
        if self._last_time is not None:
            self.step_seconds.append(now - self._last_time)
            self.step_cpu_seconds.append(cpu - self._last_cpu)
            if self.counter is not None:
                counts = self.counter.snapshot()
                self.step_counts.append(PassCounter.difference(counts, self._last_counts))
                self._last_counts = counts
        self._last_time, self._last_cpu = now, cpu
        return {}

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False
