"""A plain SyncDiffusion loop written from docs/algorithm.md, for tests to compare the pipeline with.

One image, one view at a time, every view with its own copy of the scheduler; nothing is shared with the
pipeline's helpers. The clean latent `x0` comes from the scheduler's input scaling (sigma schedulers) or from
`alphas_cumprod[t]` (DDIM-like ones), and a step "begins a real step" by the scheduler's own state: Heun and
KDPM2 expose `state_in_first_order`, PNDM (PLMS) re-evaluates the first timestep with its `counter` at 1.
"""

import copy
import inspect

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg


GUIDANCE = 7.5


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
    views = [
        (h, w)
        for h in view_starts(height, n, stride, False)
        for w in view_starts(width, n, stride, circular)
    ]
    anchor = views[len(views) // 2]
    schedulers = {view: copy.deepcopy(scheduler) for view in views}

    def crop(z, view):
        return z[:, :, view[0] : view[0] + n][..., [(view[1] + k) % width for k in range(n)]]

    def noise(u, t):
        uncond, cond = unet(torch.cat([u, u]), t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample.chunk(2)
        guided = uncond + GUIDANCE * (cond - uncond)
        return rescale_noise_cfg(guided, cond, guidance_rescale=guidance_rescale) if guidance_rescale > 0 else guided

    def image(u, eps, alpha, sigma):
        x0 = {"epsilon": (u - sigma * eps) / alpha, "v_prediction": alpha * u - sigma * eps, "sample": eps}[prediction_type]
        return (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)

    real_step = -1
    for t in scheduler.timesteps:
        first = begins_a_real_step(schedulers[anchor])
        real_step += first
        sync = (
            sync_weight > 0
            and first
            and real_step < sync_thres
            and (real_step + 1) % sync_freq == 0
        )
        weight = sync_weight * sync_decay_rate**real_step if weight_at is None else weight_at(real_step)
        if sync:
            c, alpha, sigma = vp_coefficients(schedulers[anchor], t)
            u = c * crop(z, anchor)
            anchor_image = image(u, noise(u, t), alpha, sigma)
        value, count = torch.zeros_like(z), torch.zeros_like(z)
        for view in views:
            view_scheduler = schedulers[view]
            z_v = crop(z, view)
            if sync and view != anchor:
                c, alpha, sigma = vp_coefficients(view_scheduler, t)
                u = (c * z_v).requires_grad_(True)
                with torch.enable_grad():
                    # LPIPS runs in float32 whatever the models' dtype, as in the pipeline.
                    predicted = image(u, noise(u, t), alpha, sigma)
                    loss = lpips(predicted.float() * 2 - 1, anchor_image.float() * 2 - 1).sum()
                    (grad,) = torch.autograd.grad(loss, u)
                z_v = (u - weight * grad).detach() / c
            eps = noise(view_scheduler.scale_model_input(z_v, t), t)
            accepts_generator = "generator" in inspect.signature(view_scheduler.step).parameters
            kwargs = {"generator": generator} if accepts_generator else {}
            z_next = view_scheduler.step(eps, t, z_v, **kwargs).prev_sample
            columns = [(view[1] + k) % width for k in range(n)]
            value[:, :, view[0] : view[0] + n, columns] += z_next
            count[:, :, view[0] : view[0] + n, columns] += 1
        z = value / count
        if trajectory is not None:
            trajectory.append(z)
    return z
