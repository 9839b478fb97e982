"""A plain Z-Image panorama loop (MultiDiffusion and SyncDiffusion) written from the algorithm, for tests to compare
the Z-Image pipeline with.

Nothing here comes from the pipeline: views, the transformer's call on each view as on one image of the window's
size (a list of `(channels, 1, h, w)` images, as `ZImagePipeline` passes them), Z-Image's classifier-free guidance
per image with `cfg_normalization` and `cfg_truncation`, the timestep shift, the Euler step and the synchronization
update are written out. From diffusers' `ZImagePipeline` it uses only `_encode_prompt` (the text encoder is not part
of the algorithm) and its models.
"""

import torch

from tests.flux_reference import shifted_sigmas, timestep_shift
from tests.reference_loop import view_starts


def default_sigmas(steps):
    """ZImagePipeline's sigmas before the shift: `torch.linspace(1, 1 / steps, steps)`, as Python floats."""
    return torch.linspace(1.0, 1 / steps, steps).tolist()


def decode(vae, clean_latents):
    """The loss image `clamp(D(x0 / scaling_factor + shift_factor) / 2 + 0.5, 0, 1)`."""
    raw = clean_latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    return (vae.decode(raw).sample / 2 + 0.5).clamp(0, 1)


def guide(positive, negative, scale, normalization):
    """Z-Image's guidance of one image's transformer outputs: `pos + scale (pos - neg)`, scaled down to
    `normalization` times the positive output's norm where it is longer."""
    guided = positive + scale * (positive - negative)
    if normalization and float(normalization) > 0:
        limit = torch.linalg.vector_norm(positive) * float(normalization)
        norm = torch.linalg.vector_norm(guided)
        if norm > limit:
            guided = guided * (limit / norm)
    return guided


def step_guidance_scales(timesteps, guidance_scale, cfg_truncation):
    """The guidance scale of each step: 0 where the normalized time `(1000 - t) / 1000` exceeds `cfg_truncation`."""
    if guidance_scale <= 0 or cfg_truncation is None or cfg_truncation > 1:
        return [guidance_scale] * len(timesteps)
    return [0.0 if (1000 - float(t)) / 1000 > cfg_truncation else guidance_scale for t in timesteps]


@torch.no_grad()
def z_image_reference(
    pipe,
    prompt,
    latents,
    steps,
    window,
    stride,
    guidance_scale=5.0,
    negative_prompt=None,
    cfg_normalization=False,
    cfg_truncation=1.0,
    sigmas=None,
    max_sequence_length=512,
    circular=False,
    sync_weight=0.0,
    sync_thres=5,
    sync_decay_rate=0.95,
    sync_freq=1,
    perceptual_loss=None,
    weight_at=None,
    trajectory=None,
):
    """
    The panorama latent `(B, 16, H/8, W/8)` after `steps` steps from the noise `latents` (B images of `prompt`), with
    views `window` latents wide every `stride` latents, and `pipe`'s transformer, VAE and scheduler config.

    Guidance (`guidance_scale > 0`) uses `negative_prompt` ("" by default). `sync_weight > 0` synchronizes the first
    `sync_thres` steps (every `sync_freq`-th) with `perceptual_loss(a, b)` (images in [-1, 1], float32)
    differentiated through the VAE decoder and the transformer. `weight_at(step)` replaces the weight (to check that
    a test catches a wrong one). Each step's latents are appended to the list `trajectory` if given.
    """
    transformer, vae = pipe.transformer, pipe.vae
    batch, dtype = latents.shape[0], transformer.dtype
    wide = torch.promote_types(dtype, torch.float32)  # Z-Image keeps latents and steps in float32

    def encode(text):
        return pipe._encode_prompt([text], device="cpu", max_sequence_length=max_sequence_length)[0]

    positive = [encode(prompt)] * batch
    negative = [encode(negative_prompt or "")] * batch if guidance_scale > 0 else None

    def velocity(view_latents, t, scale):
        """The guided velocity of one view's images: the transformer predicts its negative."""
        guided = negative is not None and scale > 0
        images = list(view_latents.to(dtype).unsqueeze(2).unbind(0))
        captions = positive + negative if guided else positive
        time = ((1000 - t) / 1000).expand(len(images) * (2 if guided else 1))
        outputs = transformer(images + images if guided else images, time, captions, return_dict=False)[0]
        outputs = [output.to(wide) for output in outputs]
        if guided:
            outputs = [guide(p, n, scale, cfg_normalization) for p, n in zip(outputs[:batch], outputs[batch:])]
        return -torch.stack(outputs).squeeze(2)

    def loss_image(view_latents, v, sigma):
        return decode(vae, view_latents - sigma * v)

    sigma_schedule, timesteps = shifted_sigmas(
        pipe.scheduler,
        steps,
        timestep_shift((window // 2) ** 2, pipe.scheduler.config),
        default_sigmas(steps) if sigmas is None else sigmas,
    )
    scales = step_guidance_scales(timesteps, guidance_scale, cfg_truncation)
    z = latents.to(wide).clone()
    height, width = z.shape[-2:]
    rows = view_starts(height, window, stride, False)
    views = [(r, c) for r in rows for c in view_starts(width, window, stride, circular)]
    anchor = views[len(views) // 2]

    def columns(view):
        return [(view[1] + k) % width for k in range(window)]

    def crop(z, view):
        return z[:, :, view[0] : view[0] + window][..., columns(view)]

    for step, t in enumerate(timesteps):
        sigma, sigma_next, scale = sigma_schedule[step], sigma_schedule[step + 1], scales[step]
        sync = sync_weight > 0 and len(views) > 1 and step < sync_thres and (step + 1) % sync_freq == 0
        weight = sync_weight * sync_decay_rate**step if weight_at is None else weight_at(step)
        if sync:
            anchor_latents = crop(z, anchor)
            anchor_image = loss_image(anchor_latents, velocity(anchor_latents, t, scale), sigma).float()
        value, count = torch.zeros_like(z), torch.zeros_like(z)
        for view in views:
            view_latents = crop(z, view)
            if sync and view != anchor:
                view_latents = view_latents.detach().requires_grad_(True)
                with torch.enable_grad():
                    image = loss_image(view_latents, velocity(view_latents, t, scale), sigma)
                    loss = perceptual_loss(image.float() * 2 - 1, anchor_image * 2 - 1).sum()
                    (grad,) = torch.autograd.grad(loss, view_latents)
                view_latents = (view_latents - weight * grad).detach()
            v = velocity(view_latents, t, scale)
            # The Euler step as FlowMatchEulerDiscreteScheduler computes it: the sample upcast to float32.
            stepped = (view_latents.to(torch.float32) + (sigma_next - sigma) * v).to(v.dtype)
            value[:, :, view[0] : view[0] + window, columns(view)] += stepped
            count[:, :, view[0] : view[0] + window, columns(view)] += 1
        z = value / count
        if trajectory is not None:
            trajectory.append(z)
    return z
