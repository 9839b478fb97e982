"""A plain FLUX.2 [klein] panorama loop (MultiDiffusion and SyncDiffusion) written from the algorithm, for tests to
compare the FLUX.2 [klein] pipeline with.

Nothing here comes from the pipeline: views, the 2x2 patches and their packing with each view's own position ids,
the VAE's batch-norm (de)normalization, the empirical timestep shift, classifier-free guidance, the Euler step and the
synchronization update are written out. From diffusers' `Flux2KleinPipeline` it uses only `encode_prompt` (the text
encoder is not part of the algorithm) and its models. A view is one FLUX.2 image of the window's size: it is packed
alone, with the ids `Flux2KleinPipeline` gives an image of that size, and the sigma schedule is shifted for the
window's token count and the number of steps.

The panorama latent is `(B, 32, H/8, W/8)`: the transformer's normalized latent with its patches laid out, feature
`c*4 + dy*2 + dx` of the token of patch `(y, x)` being `latent[c, 2y + dy, 2x + dx]`.
"""

import math

import numpy as np
import torch

from tests.reference_loop import view_starts


def patchify(latents):
    """`(B, C, h, w)` -> `(B, 4C, h/2, w/2)`: each 2x2 patch's pixels as channels `c*4 + dy*2 + dx`."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(patches):
    """The inverse of `patchify`."""
    b, c4, h2, w2 = patches.shape
    return patches.reshape(b, c4 // 4, 2, 2, h2, w2).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h2 * 2, w2 * 2)


def pack(latents):
    """`(B, C, h, w)` -> `(B, h/2 * w/2, 4C)`: one token per 2x2 patch, row-major."""
    patches = patchify(latents)
    return patches.flatten(2).transpose(1, 2)


def unpack(tokens, h, w):
    """The inverse of `pack` for an `h x w` latent."""
    b, _, features = tokens.shape
    return unpatchify(tokens.transpose(1, 2).reshape(b, features, h // 2, w // 2))


def image_ids(h, w):
    """Position ids `[t, row, column, l] = [0, row, column, 0]` of an `h x w`-latent image's tokens, row-major."""
    rows, columns = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, columns, zeros], dim=-1).reshape(-1, 4)


def empirical_mu(num_tokens, steps):
    """FLUX.2's timestep shift: linear in the step count between its fits at 10 and 200 steps (each linear in the
    token count), and the 200-step fit alone above 4300 tokens."""
    at_200 = 0.00016927 * num_tokens + 0.45666666
    if num_tokens > 4300:
        return at_200
    at_10 = 8.73809524e-05 * num_tokens + 1.89833333
    slope = (at_200 - at_10) / 190.0
    return slope * steps + (at_200 - 200.0 * slope)


def shifted_sigmas(scheduler, steps, mu, sigmas=None):
    """The sigma schedule (with a final 0) and timesteps of a `steps`-step run shifted by `mu` with FLUX.2's
    exponential time shift (computed in float32 numpy, as the scheduler does)."""
    config = scheduler.config
    base = (np.linspace(1.0, 1 / steps, steps) if sigmas is None else np.array(sigmas)).astype(np.float32)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / base - 1))
    shifted = torch.from_numpy(shifted).to(torch.float32)
    return torch.cat([shifted, torch.zeros(1)]), shifted * config.num_train_timesteps


def vae_latents(vae, latents):
    """The VAE's latent of the transformer's: every patch channel times its batch-norm standard deviation, plus its
    mean."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.dtype)
    return unpatchify(patchify(latents) * std + mean)


def normalized_latents(vae, raw):
    """The inverse of `vae_latents`: the transformer's latent of the VAE's `raw` one."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(raw.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(raw.dtype)
    return unpatchify((patchify(raw) - mean) / std)


def decode(vae, clean_latents):
    """The loss image `clamp(D(vae_latents(x0)) / 2 + 0.5, 0, 1)`."""
    return (vae.decode(vae_latents(vae, clean_latents)).sample / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def flux2_reference(
    pipe,
    prompt,
    latents,
    steps,
    window,
    stride,
    guidance_scale=4.0,
    negative_prompt="",
    max_sequence_length=32,
    circular=False,
    sync_weight=0.0,
    sync_thres=5,
    sync_decay_rate=0.95,
    sync_freq=1,
    perceptual_loss=None,
    weight_at=None,
    anchor_index=None,
):
    """
    The panorama latent `(B, 32, H/8, W/8)` after `steps` steps from the noise `latents` (B images of `prompt`),
    with views `window` latents wide every `stride` latents, and `pipe`'s transformer, VAE and scheduler config.

    `guidance_scale > 1` guides with `negative_prompt` (classifier-free guidance; `pipe.config.is_distilled` turns
    it off). `sync_weight > 0` synchronizes the first `sync_thres` steps (every `sync_freq`-th) with
    `perceptual_loss(a, b)` (images in [-1, 1], float32) differentiated through the VAE decoder and the transformer.
    `weight_at(step)` replaces the weight (to check that a test catches a wrong one). The anchor is the middle view,
    or view `anchor_index` (row-major).
    """
    transformer, vae = pipe.transformer, pipe.vae
    batch, dtype = latents.shape[0], transformer.dtype

    def encode(text):
        embeds, text_ids = pipe.encode_prompt(text, max_sequence_length=max_sequence_length)
        return embeds.repeat(batch, 1, 1), text_ids

    positive = encode(prompt)
    guided = guidance_scale > 1 and not pipe.config.is_distilled
    negative = encode(negative_prompt) if guided else None
    ids = image_ids(window, window)

    def velocity_of(view_latents, t, text):
        embeds, text_ids = text
        return transformer(
            hidden_states=pack(view_latents),
            timestep=t.expand(batch).to(dtype) / 1000,
            guidance=None,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=ids,
            return_dict=False,
        )[0]

    def velocity(view_latents, t):
        """The guided velocity of one view, patches laid out."""
        v = velocity_of(view_latents, t, positive)
        if negative is not None:
            v_negative = velocity_of(view_latents, t, negative)
            v = v_negative + guidance_scale * (v - v_negative)
        return unpack(v, window, window)

    def loss_image(view_latents, v, sigma):
        return decode(vae, view_latents - sigma * v)

    sigma_schedule, timesteps = shifted_sigmas(pipe.scheduler, steps, empirical_mu((window // 2) ** 2, steps))
    z = latents.to(dtype).clone()
    height, width = z.shape[-2:]
    rows = view_starts(height, window, stride, False)
    views = [(r, c) for r in rows for c in view_starts(width, window, stride, circular)]
    anchor = views[len(views) // 2 if anchor_index is None else anchor_index]

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
    return z
