"""A plain FLUX.1 panorama loop (MultiDiffusion and SyncDiffusion) written from the algorithm, for tests to compare
the FLUX pipeline with.

Nothing here comes from the pipeline: views, 2x2 packing with each view's own image ids, the timestep shift, the
Euler step and the synchronization update are written out. From diffusers' `FluxPipeline` it uses only
`encode_prompt` (the text encoders are not part of the algorithm) and its models. A view is one FLUX image of the
window's size: it is packed alone, with the ids `FluxPipeline` gives an image of that size, and the sigma schedule
is shifted by the window's token count.
"""

import math

import numpy as np
import torch

from tests.reference_loop import view_starts


def pack(latents):
    """`(B, C, h, w)` -> `(B, h/2 * w/2, 4C)`: one token per 2x2 patch, row-major; feature `c*4 + dy*2 + dx`."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens, h, w):
    """The inverse of `pack` for an `h x w` latent."""
    b, _, features = tokens.shape
    patches = tokens.reshape(b, h // 2, w // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, features // 4, h, w)


def image_ids(h, w, dtype):
    """Position ids `[0, row, column]` of an `h x w`-latent image's tokens (one per 2x2 patch), row-major."""
    rows, columns = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3).to(dtype)


def timestep_shift(num_tokens, config):
    """`mu`: the shift grows linearly from `base_shift` at `base_image_seq_len` tokens to `max_shift` at
    `max_image_seq_len`."""
    slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    return config.base_shift + slope * (num_tokens - config.base_image_seq_len)


def shifted_sigmas(scheduler, steps, mu, sigmas=None):
    """The sigma schedule (with a final 0) and timesteps of a `steps`-step run shifted by `mu` (computed in float32
    numpy, as the scheduler does: torch's `scalar / tensor` rounds twice and differs in the last bit)."""
    config = scheduler.config
    base = (np.linspace(1.0, 1 / steps, steps) if sigmas is None else np.array(sigmas)).astype(np.float32)
    if config.use_dynamic_shifting:
        shifted = math.exp(mu) / (math.exp(mu) + (1 / base - 1))
    else:
        shifted = config.shift * base / (1 + (config.shift - 1) * base)
    shifted = torch.from_numpy(shifted).to(torch.float32)
    return torch.cat([shifted, torch.zeros(1)]), shifted * config.num_train_timesteps


def decode(vae, clean_latents):
    """The loss image `clamp(D(x0 / scaling_factor + shift_factor) / 2 + 0.5, 0, 1)`."""
    raw = clean_latents / vae.config.scaling_factor + vae.config.shift_factor
    return (vae.decode(raw).sample / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def flux_reference(
    pipe,
    prompt,
    latents,
    steps,
    window,
    stride,
    guidance_scale=3.5,
    negative_prompt=None,
    true_cfg_scale=1.0,
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
    The panorama latent `(B, 16, H/8, W/8)` after `steps` steps from the noise `latents` (B images of `prompt`),
    with views `window` latents wide every `stride` latents, and `pipe`'s transformer, VAE and scheduler config.

    `sync_weight > 0` synchronizes the first `sync_thres` steps (every `sync_freq`-th) with `perceptual_loss(a, b)`
    (images in [-1, 1], float32) differentiated through the VAE decoder and the transformer. `weight_at(step)`
    replaces the weight (to check that a test catches a wrong one). Each step's latents are appended to the list
    `trajectory` if given.
    """
    transformer, vae = pipe.transformer, pipe.vae
    batch, dtype = latents.shape[0], transformer.dtype

    def encode(text):
        embeds, pooled, text_ids = pipe.encode_prompt(text, max_sequence_length=max_sequence_length)
        return embeds.repeat(batch, 1, 1), pooled.repeat(batch, 1), text_ids

    positive = encode(prompt)
    negative = encode(negative_prompt) if negative_prompt is not None and true_cfg_scale > 1 else None
    ids = image_ids(window, window, dtype)
    guidance = (
        torch.full((batch,), guidance_scale, dtype=torch.float32) if transformer.config.guidance_embeds else None
    )

    def velocity_of(view_latents, t, text):
        embeds, pooled, text_ids = text
        return transformer(
            hidden_states=pack(view_latents),
            timestep=t.expand(batch).to(dtype) / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=ids,
            return_dict=False,
        )[0]

    def velocity(view_latents, t):
        """The (true-CFG guided) velocity of one view, unpacked."""
        v = velocity_of(view_latents, t, positive)
        if negative is not None:
            v_negative = velocity_of(view_latents, t, negative)
            v = v_negative + true_cfg_scale * (v - v_negative)
        return unpack(v, window, window)

    def loss_image(view_latents, v, sigma):
        return decode(vae, view_latents - sigma * v)

    sigma_schedule, timesteps = shifted_sigmas(
        pipe.scheduler, steps, timestep_shift((window // 2) ** 2, pipe.scheduler.config), sigmas
    )
    z = latents.to(dtype).clone()
    height, width = z.shape[-2:]
    rows = view_starts(height, window, stride, False)
    views = [(r, c) for r in rows for c in view_starts(width, window, stride, circular)]
    anchor = views[len(views) // 2]

    def columns(view):
        return [(view[1] + k) % width for k in range(window)]

    def crop(z, view):
        return z[:, :, view[0] : view[0] + window][..., columns(view)]

    for step, t in enumerate(timesteps):
        sigma, sigma_next = sigma_schedule[step], sigma_schedule[step + 1]
        sync = sync_weight > 0 and len(views) > 1 and step < sync_thres and (step + 1) % sync_freq == 0
        weight = sync_weight * sync_decay_rate**step if weight_at is None else weight_at(step)
        if sync:
            anchor_latents = crop(z, anchor)
            anchor_image = loss_image(anchor_latents, velocity(anchor_latents, t), sigma).float()
        # Summed in float32 at least (float16 sums of many views lose the low bits).
        accumulate = torch.promote_types(z.dtype, torch.float32)
        value, count = torch.zeros_like(z, dtype=accumulate), torch.zeros_like(z, dtype=accumulate)
        for view in views:
            view_latents = crop(z, view)
            if sync and view != anchor:
                view_latents = view_latents.detach().requires_grad_(True)
                with torch.enable_grad():
                    image = loss_image(view_latents, velocity(view_latents, t), sigma)
                    loss = perceptual_loss(image.float() * 2 - 1, anchor_image * 2 - 1).sum()
                    (grad,) = torch.autograd.grad(loss, view_latents)
                view_latents = (view_latents - weight * grad).detach()
            v = velocity(view_latents, t)
            # The Euler step as FlowMatchEulerDiscreteScheduler computes it: the sample upcast to float32.
            stepped = (view_latents.to(torch.float32) + (sigma_next - sigma) * v).to(v.dtype)
            value[:, :, view[0] : view[0] + window, columns(view)] += stepped
            count[:, :, view[0] : view[0] + window, columns(view)] += 1
        z = (value / count).to(dtype)
        if trajectory is not None:
            trajectory.append(z)
    return z
