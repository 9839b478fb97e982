"""A plain SyncDiffusion loop written from docs/algorithm.md, for tests to compare the pipeline with.

One image, one view at a time, every view with its own copy of the scheduler; nothing is shared with the
pipeline's helpers. The clean latent `x0` comes from the scheduler's input scaling (sigma schedulers) or from
`alphas_cumprod[t]` (DDIM-like ones), and a step "begins a real step" by the scheduler's own state: Heun and
KDPM2 expose `state_in_first_order`, PNDM (PLMS) re-evaluates the first timestep with its `counter` at 1.
"""

import copy
import inspect
import sys
from unittest import mock

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg


GUIDANCE = 7.5

# Reference comparisons run in float64 with a smooth perceptual loss (`for_reference_comparison`). With LPIPS on a
# random VGG, float32 rounding differences (1e-6 of the latents) come out of the gradient amplified by LPIPS's
# feature normalization: up to 5.8e-4 with v-prediction (Euler), and still 4e-5 with float64 models (the pipeline
# keeps LPIPS in float32). With the smooth loss in float64 the pipeline and the reference agree to 4.4e-8..2.2e-7 of
# the largest latent after every step, with every scheduler (3 steps, 2 synchronized), while a weight of 20 instead
# of 19 at the second synchronized step moves the latents by 3.0e-5 (KDPM2-Ancestral, the least) to 7.9e-3 (Euler,
# v-prediction). 2e-6 lies between: 9x above the noise, 15x below the smallest such error (test_schedulers checks
# that it fails).
RELATIVE_TOLERANCE = 2e-6


class SmoothPerceptualLoss(torch.nn.Module):
    """A smooth stand-in for LPIPS with its interface: the squared distance of random tanh-conv features, per image
    (shape `(N, 1, 1, 1)`). The algorithm does not depend on which image distance it descends."""

    def __init__(self, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) * 0.2)
            self.conv.bias.zero_()

    def forward(self, images, anchor_images):
        features, anchor_features = torch.tanh(self.conv(images)), torch.tanh(self.conv(anchor_images))
        return ((features - anchor_features) ** 2).mean(dim=(1, 2, 3), keepdim=True)


def for_reference_comparison(pipe):
    """`pipe` in float64 with the smooth perceptual loss: the set-up of every step-by-step reference comparison."""
    pipe.set_perceptual_loss(SmoothPerceptualLoss())
    return pipe.to(torch.float64)


def assert_trajectories_match(ours, expected, tolerance=RELATIVE_TOLERANCE):
    """Latents after every evaluation agree to `tolerance` times that step's largest latent."""
    assert len(ours) == len(expected)
    for step, (a, b) in enumerate(zip(ours, expected)):
        error = ((a - b).abs().max() / b.abs().max()).item()
        assert error < tolerance, f"evaluation {step}: relative error {error:.2e}"


def pipeline_trajectory(pipe, prompt, latents, **call):
    """`pipe`'s latents after every evaluation (as `callback_on_step_end` sees them) and the final ones."""
    trajectory = []

    def record(pipeline, step, timestep, tensors):
        trajectory.append(tensors["latents"].clone())
        return {}

    with torch.no_grad():
        pipe(prompt, latents=latents, callback_on_step_end=record, output_type="latent", **call)
    return trajectory


def view_starts(size, window, stride, circular):
    """Start offsets of the views along one axis (a flush extra view when the stride does not divide the span)."""
    if size <= window:
        return [0]
    if circular:
        return list(range(0, size, stride))
    starts = list(range(0, size - window + 1, stride))
    return starts if starts[-1] == size - window else starts + [size - window]


def begins_a_real_step(scheduler):
    """Whether the scheduler's next `step` starts from the sample it is given (not a correction of a stored one)."""
    if hasattr(scheduler, "state_in_first_order"):  # Heun, KDPM2, KDPM2-Ancestral
        return scheduler.state_in_first_order
    if hasattr(scheduler, "cur_sample"):  # PNDM: its 2nd PLMS call rebuilds from the sample stored at the 1st
        return not (scheduler.counter == 1 and scheduler.config.skip_prk_steps)
    return True


def vp_coefficients(scheduler, t):
    """`(c, alpha, sigma)`: the UNet input is `u = c z = alpha x0 + sigma eps` at this evaluation."""
    c = scheduler.scale_model_input(torch.ones(()), t).item()
    if c != 1.0 or not hasattr(scheduler, "alphas_cumprod") or float(t) != int(t):
        # Sigma schedulers feed the UNet z / sqrt(sigma^2 + 1) with z = x0 + sigma eps: alpha = c.
        alpha = c
    else:
        alpha = scheduler.alphas_cumprod[int(t)].item() ** 0.5
    return c, alpha, (1 - alpha**2) ** 0.5


@torch.no_grad()
def reference_syncdiffusion(
    pipe,
    prompt,
    latents,
    steps,
    stride,
    sync_weight=20.0,
    sync_thres=5,
    sync_decay_rate=0.95,
    sync_freq=1,
    scheduler=None,
    circular=False,
    guidance_rescale=0.0,
    image_embeds=None,
    generator=None,
    weight_at=None,
    trajectory=None,
):
    """
    SyncDiffusion latents for `latents` (one image, before `init_noise_sigma`), with `pipe`'s models and
    `scheduler` (default: the pipeline's, copied). `image_embeds` is one IP-Adapter's `[negative, positive]`
    embeddings. Every step's latents are appended to the list `trajectory` if given. `weight_at(real_step)` replaces the synchronization weight (to check that a test catches a wrong one).
    """
    unet, vae, lpips = pipe.unet, pipe.vae, pipe.perceptual_loss("cpu")
    scheduler = copy.deepcopy(scheduler if scheduler is not None else pipe.scheduler)
    scheduler.set_timesteps(steps)
    positive, negative = pipe.encode_prompt(prompt, "cpu", 1, True)
    embeds = torch.cat([negative, positive])
    added = {"image_embeds": [image_embeds]} if image_embeds is not None else None
    prediction_type = scheduler.config.prediction_type
    n = unet.config.sample_size
    z = latents.clone() * scheduler.init_noise_sigma
    height, width = z.shape[-2:]
    views = [(h, w) for h in view_starts(height, n, stride, False) for w in view_starts(width, n, stride, circular)]
    anchor = views[len(views) // 2]
    schedulers = {view: copy.deepcopy(scheduler) for view in views}

    def crop(z, view):
        return z[:, :, view[0] : view[0] + n][..., [(view[1] + k) % width for k in range(n)]]

    def noise(u, t):
        uncond, cond = unet(torch.cat([u, u]), t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample.chunk(
            2
        )
        guided = uncond + GUIDANCE * (cond - uncond)
        return rescale_noise_cfg(guided, cond, guidance_rescale=guidance_rescale) if guidance_rescale > 0 else guided

    def image(u, eps, alpha, sigma):
        x0 = {"epsilon": (u - sigma * eps) / alpha, "v_prediction": alpha * u - sigma * eps, "sample": eps}[
            prediction_type
        ]
        return (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)

    real_step = -1
    for t in scheduler.timesteps:
        first = begins_a_real_step(schedulers[anchor])
        real_step += first
        sync = sync_weight > 0 and first and real_step < sync_thres and (real_step + 1) % sync_freq == 0
        weight = sync_weight * sync_decay_rate**real_step if weight_at is None else weight_at(real_step)
        if sync:
            c, alpha, sigma = vp_coefficients(schedulers[anchor], t)
            u = c * crop(z, anchor)
            anchor_image = image(u, noise(u, t), alpha, sigma)
        value, count = torch.zeros_like(z), torch.zeros_like(z)
        step_noise = {}  # a stochastic step's noise: drawn once for the whole latent, each view takes its crop

        def view_noise(view):
            def draw(shape, generator=None, device=None, dtype=None, layout=None):
                if "panorama" not in step_noise:
                    step_noise["panorama"] = torch.randn(z.shape, generator=generator, dtype=dtype)
                return crop(step_noise["panorama"], view)

            return draw

        for view in views:
            view_scheduler = schedulers[view]
            z_v = crop(z, view)
            if sync and view != anchor:
                c, alpha, sigma = vp_coefficients(view_scheduler, t)
                u = (c * z_v).requires_grad_(True)
                with torch.enable_grad():
                    # LPIPS takes float32 images whatever the models' dtype, as in the pipeline.
                    predicted = image(u, noise(u, t), alpha, sigma)
                    loss = lpips(predicted.float() * 2 - 1, anchor_image.float() * 2 - 1).sum()
                    (grad,) = torch.autograd.grad(loss, u)
                z_v = (u - weight * grad).detach() / c
            eps = noise(view_scheduler.scale_model_input(z_v, t), t)
            accepts_generator = "generator" in inspect.signature(view_scheduler.step).parameters
            kwargs = {"generator": generator} if accepts_generator else {}
            module = sys.modules[type(view_scheduler).step.__module__]
            with mock.patch.object(module, "randn_tensor", view_noise(view), create=True):
                z_next = view_scheduler.step(eps, t, z_v, **kwargs).prev_sample
            columns = [(view[1] + k) % width for k in range(n)]
            value[:, :, view[0] : view[0] + n, columns] += z_next
            count[:, :, view[0] : view[0] + n, columns] += 1
        z = value / count
        if trajectory is not None:
            trajectory.append(z)
    return z
