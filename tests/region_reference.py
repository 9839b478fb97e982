"""A MultiDiffusion region loop written after MultiDiffusion's official `region_based.py`, for tests to compare the
pipelines' region prompts with.

Nothing here comes from the pipelines: the masks are averaged to the latent, the background weighted
`clamp(1 - sum of the region masks, 0)`, and at every step each view is denoised once per prompt with that prompt's
guided prediction and one scheduler step, adding `denoised * mask` to `value` and `mask` to `count`; the latent is
`where(count > 0, value / count, value)`. During the first `bootstrap_steps` steps a region's view latent outside its
mask is a constant-colour background noised to the step (`region_based.py`'s bootstrapping), with the random draws
the pipelines make, from a generator of their own seeded from the call's without consuming it (the seed is
`torch.randint(2**62, (1,))` drawn from a copy of the call's generator): the colours
`torch.rand((bootstrap_steps, 3, 1, 1))`, each encoded (a posterior sample) with that generator, then the choices
`torch.randint(bootstrap_steps, (bootstrap_steps, views, prompts, batch))`.

The model-specific parts are functions the caller passes: `predict(view_latents, t, prompt, view)` (the guided
model output of one view, `(row, column)` in latents, for one prompt, prompt 0 being the background's), `step(model_output, t, view_latents)` (one
scheduler step), `noised(clean, noise, t)` (the scheduler's forward noising) and `encode(images, generator)` (the
VAE's latent of images in [-1, 1]).
"""

import torch


def latent_masks(masks, factor):
    """`(regions, H, W)` pixel masks -> `(regions, H / factor, W / factor)`: each latent pixel the mean of its block."""
    regions, height, width = masks.shape
    blocks = masks.reshape(regions, height // factor, factor, width // factor, factor)
    return blocks.mean(dim=(2, 4))


def prompt_weights(region_masks, weight_scale=None):
    """
    `(1 + regions, h, w)`: the background's weight `clamp(1 - sum of the region masks, 0)` (`region_based.py`'s
    `bg_mask`), then the regions' masks. `weight_scale = (prompt, factor)` multiplies one prompt's weight (to check
    that a test catches a wrong one).
    """
    background = torch.clamp(1 - region_masks.sum(dim=0, keepdim=True), min=0)
    weights = torch.cat([background, region_masks])
    if weight_scale is not None:
        prompt, factor = weight_scale
        weights[prompt] = weights[prompt] * factor
    return weights


def bootstrapping_generator(call_generator):
    """The generator the bootstrapping draws from: seeded with a number drawn from a copy of `call_generator`, which
    is left as it was."""
    copied = torch.Generator().set_state(call_generator.get_state())
    seed = int(torch.randint(2**62, (1,), generator=copied))
    return torch.Generator().manual_seed(seed)


def bootstrapping_draws(encode, generator, bootstrap_steps, view_pixels, num_views, num_prompts, batch):
    """`(backgrounds, choice)`: the latents of `bootstrap_steps` constant-colour view images and, per step, view,
    prompt and image, the index of the background it gets; drawn from `generator` in this order."""
    colours = torch.rand((bootstrap_steps, 3, 1, 1), generator=generator)
    backgrounds = []
    for colour in colours:
        image = (2 * colour - 1)[None].expand(1, 3, *view_pixels)
        backgrounds.append(encode(image, generator))
    choice = torch.randint(bootstrap_steps, (bootstrap_steps, num_views, num_prompts, batch), generator=generator)
    return torch.cat(backgrounds), choice


@torch.no_grad()
def region_multidiffusion(
    latents,
    timesteps,
    views,
    window,
    masks,
    factor,
    predict,
    step,
    noised=None,
    encode=None,
    bootstrap_steps=0,
    generator=None,
    weight_scale=None,
    trajectory=None,
):
    """
    The panorama latent after a MultiDiffusion region loop from `latents` (the starting latents, already scaled by
    the scheduler's `init_noise_sigma`, which is also the noise bootstrapped backgrounds get: DDIM's and flow
    matching's is 1).

    `views` are `(row, column)` starts of `window x window`-latent views; `masks` the regions' `(regions, H, W)`
    pixel masks, averaged over `factor x factor` blocks. `generator` is the call's, as it is when the call's
    bootstrapping is prepared (untouched when the starting latents are given). Every step's latents are appended to the list `trajectory`
    if given.
    """
    weights = prompt_weights(latent_masks(masks, factor), weight_scale).to(latents.dtype)
    num_prompts = weights.shape[0]
    if bootstrap_steps:
        view_pixels = (window * factor, window * factor)
        backgrounds, choice = bootstrapping_draws(
            encode,
            bootstrapping_generator(generator),
            bootstrap_steps,
            view_pixels,
            len(views),
            num_prompts,
            latents.shape[0],
        )
    noise = latents.clone()
    z = latents.clone()
    for i, t in enumerate(timesteps):
        value, count = torch.zeros_like(z), torch.zeros_like(z)
        for v, (row, column) in enumerate(views):
            rows, columns = slice(row, row + window), slice(column, column + window)
            view_latents = z[:, :, rows, columns]
            for prompt in range(num_prompts):
                mask = weights[prompt, rows, columns]
                prompt_latents = view_latents
                if i < bootstrap_steps and prompt > 0:
                    background = noised(backgrounds[choice[i, v, prompt]], noise[:, :, rows, columns], t)
                    prompt_latents = view_latents * mask + background * (1 - mask)
                denoised = step(predict(prompt_latents, t, prompt, (row, column)), t, prompt_latents)
                value[:, :, rows, columns] += denoised * mask
                count[:, :, rows, columns] += mask
        z = torch.where(count > 0, value / count, value)
        if trajectory is not None:
            trajectory.append(z)
    return z
