"""A plain panorama-from-an-image loop, for tests to compare the pipeline's `image` / `mask_image` / `strength` with.

One image, one view at a time, every view with its own copy of the (DDIM) scheduler; nothing is shared with the
pipeline's helpers. What it does is what diffusers' `StableDiffusionImg2ImgPipeline` and
`StableDiffusionInpaintPipeline` do to one window, done to every view of the panorama:

- the schedule starts `steps - int(steps * strength)` steps in;
- the random draws, in this order from the call's generator: without a mask, the image's latent (a posterior sample)
  then the noise, the start being the image's latent noised to the first timestep; with a mask, the image's latent
  (a plain UNet always, an inpainting UNet only below `strength=1`), the noise (the start itself at `strength=1`),
  and for an inpainting UNet the latent of the masked image `image * (mask < 0.5)`;
- the latent mask is the pixel mask's nearest sample (`mask[::8, ::8]`, `F.interpolate`'s default);
- an inpainting UNet sees each view's crops of the latent mask and the masked image's latent after its latents; a
  plain UNet's panorama gets, after every step, the kept region `1 - mask` back from the image's latent noised to
  the next timestep (the latent itself after the last);
- synchronized steps pull every view but the anchor toward the anchor's predicted image (reference_loop.py's
  update, DDIM's clean latent `(z - sqrt(1 - a) eps) / sqrt(a)`), the anchor being the middle view or, with
  `anchor="image"`, the view that keeps most of the image (the largest sum of `1 - mask` over its latent pixels,
  ties to the view nearest the middle).
"""

import copy

import torch
from reference_loop import GUIDANCE, view_starts


def latent_mask(mask, factor):
    """The `(1, 1, H, W)` pixel mask at latent resolution: every `factor`-th pixel (nearest interpolation)."""
    return mask[:, :, ::factor, ::factor]


def image_anchor(views, keep, window):
    """The index of the view with the most of `keep` (`1 - latent mask`); ties go to the view nearest the middle."""
    kept = [float(keep[:, :, row : row + window, column : column + window].sum()) for row, column in views]
    middle = len(views) // 2
    return max(range(len(views)), key=lambda k: (kept[k], -abs(k - middle)))


def posterior_sample(vae, images, generator):
    """The UNet's latent of `images` in [-1, 1]: a sample of the VAE encoder's distribution, scaled."""
    return vae.encode(images).latent_dist.sample(generator) * vae.config.scaling_factor


@torch.no_grad()
def reference_image_panorama(
    pipe,
    prompt,
    image,
    mask,
    strength,
    steps,
    stride,
    generator,
    sync_weight=0.0,
    sync_thres=5,
    sync_decay_rate=0.95,
    anchor="center",
    trajectory=None,
):
    """
    The final latents of one image's panorama from `image` (`(1, 3, H, W)` in [-1, 1]) and `mask` (`(1, 1, H, W)` in
    [0, 1], white = generate; None: image-to-image), with `pipe`'s models and a copy of its DDIM scheduler, guidance
    7.5 and `generator`'s draws. `anchor`: "center", "image" (with a mask) or a view index. Every step's latents
    (after the kept region is put back) are appended to the list `trajectory` if given.
    """
    unet, vae = pipe.unet, pipe.vae
    dtype = unet.dtype
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps[steps - int(steps * strength) :]
    positive, negative = pipe.encode_prompt(prompt, "cpu", 1, True)
    embeds = torch.cat([negative, positive])
    factor = pipe.vae_scale_factor
    window = unet.config.sample_size
    image = image.to(dtype)
    shape = (1, vae.config.latent_channels, image.shape[-2] // factor, image.shape[-1] // factor)
    inpainting_unet = unet.config.in_channels == 2 * vae.config.latent_channels + 1

    # The random draws, in diffusers' order.
    image_latents = None
    if mask is None or not inpainting_unet or strength < 1:
        image_latents = posterior_sample(vae, image, generator)
    noise = torch.randn(shape, generator=generator, dtype=dtype)
    if mask is not None and strength == 1:
        z = noise * scheduler.init_noise_sigma
    else:
        z = scheduler.add_noise(image_latents, noise, timesteps[:1])
    extra_channels = None
    if mask is not None:
        pixel_mask, mask = mask.to(dtype), latent_mask(mask.to(dtype), factor)
        if inpainting_unet:
            masked_image_latents = posterior_sample(vae, image * (pixel_mask < 0.5), generator)
            extra_channels = torch.cat([mask, masked_image_latents], dim=1)

    views = [
        (h, w)
        for h in view_starts(shape[-2], window, stride, False)
        for w in view_starts(shape[-1], window, stride, False)
    ]
    if anchor == "center":
        anchor = len(views) // 2
    elif anchor == "image":
        anchor = image_anchor(views, 1 - mask, window)
    anchor = views[anchor]
    schedulers = {view: copy.deepcopy(scheduler) for view in views}

    def crop(x, view):
        return x[:, :, view[0] : view[0] + window, view[1] : view[1] + window]

    def guided_noise(u, t, view):
        if extra_channels is not None:
            u = torch.cat([u, crop(extra_channels, view)], dim=1)
        uncond, cond = unet(torch.cat([u, u]), t, encoder_hidden_states=embeds).sample.chunk(2)
        return uncond + GUIDANCE * (cond - uncond)

    def predicted_image(u, t, view):
        alpha = scheduler.alphas_cumprod[int(t)].item()
        x0 = (u - (1 - alpha) ** 0.5 * guided_noise(u, t, view)) / alpha**0.5
        return (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)

    lpips = pipe.perceptual_loss("cpu")
    for step, t in enumerate(timesteps):
        sync = sync_weight > 0 and step < sync_thres and len(views) > 1
        if sync:
            anchor_image = predicted_image(crop(z, anchor), t, anchor)
        value, count = torch.zeros_like(z), torch.zeros_like(z)
        for view in views:
            z_v = crop(z, view)
            if sync and view != anchor:
                u = z_v.clone().requires_grad_(True)
                with torch.enable_grad():
                    loss = lpips(predicted_image(u, t, view).float() * 2 - 1, anchor_image.float() * 2 - 1).sum()
                    (grad,) = torch.autograd.grad(loss, u)
                z_v = (u - sync_weight * sync_decay_rate**step * grad).detach()
            eps = guided_noise(schedulers[view].scale_model_input(z_v, t), t, view)
            z_next = schedulers[view].step(eps, t, z_v).prev_sample
            value[:, :, view[0] : view[0] + window, view[1] : view[1] + window] += z_next
            count[:, :, view[0] : view[0] + window, view[1] : view[1] + window] += 1
        z = value / count
        if mask is not None and not inpainting_unet:
            kept = image_latents
            if step < len(timesteps) - 1:
                kept = scheduler.add_noise(image_latents, noise, timesteps[step + 1 : step + 2])
            z = (1 - mask) * kept + mask * z
        if trajectory is not None:
            trajectory.append(z)
    return z
