"""Outpainting: a photo placed on a panorama-sized canvas, and the mask that has the pipeline generate the rest.

    from syncdiffusion_utils.outpainting import place_photo

    image, mask_image = place_photo(photo, 512, 2048, position="center")
    panorama = pipe(prompt, height=512, width=2048, image=image, mask_image=mask_image).images[0]

The photo is scaled to the panorama's height (its aspect ratio kept) and placed at the left, the centre, the right
or a column in pixels; a 360-degree panorama (`circular=True`) lets it straddle the seam. Outside the photo the
canvas holds its edge colours stretched outwards: each row continues the photo's outermost pixel, and on a
360-degree canvas the gap between the photo's right and left edges (across the seam) blends linearly from one to
the other. The mask is white there (generated) and black over the photo (kept). With `strength=1` (the default with
a mask) the generated part starts from pure noise, so the fill is not seen there; it still reaches the VAE encoder,
whose latents at the photo's border mix in a few pixels beyond it, and there a continuation of the photo's own
colours disturbs the kept region least. Below 1 the generated part starts from the fill, noised.
"""

import math
import numbers

import numpy as np
from PIL import Image


POSITIONS = ("left", "center", "right")


def _is_whole(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_size(name, value):
    if not _is_whole(value) or value < 1:
        raise ValueError(f"`{name}` has to be a positive whole number of pixels, but is {value!r}.")


def photo_placement(photo_size, height, width, position="center", circular=False):
    """
    Where `place_photo` puts a photo of `photo_size` `(width, height)` pixels on a `height x width` canvas:
    `(left, scaled_width)`, the photo's first column (in `0..width - 1`; on a 360-degree canvas the photo may run
    past the right edge and continue at column 0) and its width once scaled to the canvas height (rounded half
    up). Raises `ValueError` naming the argument for a position or size the canvas cannot take.
    """
    _check_size("height", height)
    _check_size("width", width)
    if not isinstance(circular, bool):  # not `in (True, False)`, which 1 and 0 pass
        raise ValueError(f"`circular` has to be True or False, but is {circular!r}.")
    photo_width, photo_height = photo_size
    scaled_width = math.floor(photo_width * height / photo_height + 0.5)
    if not 1 <= scaled_width < width:
        what = "0 pixels wide" if scaled_width < 1 else f"{scaled_width} pixels wide, not narrower than the panorama"
        raise ValueError(
            f"`photo` is {photo_width}x{photo_height} pixels (width x height): scaled to the panorama's height"
            f" {height} it is {what} ({width} pixels; nothing would be left to generate): a wider panorama, or crop"
            " the photo."
        )
    free = width - scaled_width
    if isinstance(position, str) and position in POSITIONS:
        left = {"left": 0, "center": free // 2, "right": free}[position]
        return left, scaled_width
    allowed = f"one of {', '.join(map(repr, POSITIONS))} or a column in pixels"
    if not _is_whole(position):
        raise ValueError(f"`position` has to be {allowed}, but is {position!r}.")
    if circular:
        if not -width < position < width:
            raise ValueError(
                f"`position` {position} is more than a turn of the {width}-pixel 360-degree panorama: a column in"
                f" {-width + 1}..{width - 1} (negative ones count from the right edge)."
            )
        return position % width, scaled_width
    if not 0 <= position <= free:
        raise ValueError(
            f"`position` {position} puts the {scaled_width}-pixel-wide photo outside the {width}-pixel panorama: a"
            f" column in 0..{free}, or a 360-degree panorama (`circular`) to let the photo straddle the seam."
        )
    return int(position), scaled_width


def _edge_fill(photo, width, left, circular):
    """A `(height, width, 3)` uint8 canvas: `photo` (an array) at column `left` (wrapping if `circular`), each row
    continued by its outermost pixels (on a 360-degree canvas: blended linearly across the gap)."""
    height, photo_width, _ = photo.shape
    columns = (left + np.arange(photo_width)) % width
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:, columns] = photo
    first, last = photo[:, :1].astype(np.float64), photo[:, -1:].astype(np.float64)
    if circular:
        gap = width - photo_width
        share = np.arange(1, gap + 1)[None, :, None] / (gap + 1)  # 0 at the right edge, 1 at the left
        blend = last + (first - last) * share
        canvas[:, (left + photo_width + np.arange(gap)) % width] = np.floor(blend + 0.5).astype(np.uint8)
    else:
        canvas[:, :left] = photo[:, :1]
        canvas[:, left + photo_width :] = photo[:, -1:]
    return canvas


def place_photo(photo, height, width, position="center", circular=False):
    """
    A photo on a `height x width` canvas, to outpaint into a panorama.

    Args:
        photo (`PIL.Image.Image`):
            The photo, any size and mode (converted to RGB: transparency is dropped). It is scaled to `height`
            (Lanczos, its aspect ratio kept; not resampled when it is already that tall) and must then be narrower
            than `width`.
        height (`int`), width (`int`):
            The panorama's size in pixels.
        position (`str` or `int`, defaults to `"center"`):
            `"left"`, `"center"` (the free columns split evenly, the odd one on the right), `"right"`, or the
            photo's first column in pixels from the left: `0..width - scaled width`, or with `circular=True`
            anything in `-width + 1..width - 1` (taken modulo `width`), where the photo may straddle the seam and
            continue at the other edge.
        circular (`bool`, defaults to False):
            A 360-degree panorama (the pipeline's `circular_padding=True`): the left and right edges meet.

    Returns:
        `(image, mask_image)`: an RGB and an "L" PIL image of the canvas's size. `image` holds the photo and around
        it the photo's edge colours (see the module's docstring); `mask_image` is white (255, generated) outside
        the photo and black (0, kept) over it, exactly the photo's pixel columns.

    Raises `ValueError` naming the argument for a photo that is not a PIL image, a bad size or position, or a photo
    at least as wide as the canvas once scaled.
    """
    if not isinstance(photo, Image.Image):
        raise ValueError(f"`photo` has to be a PIL image, but is {type(photo)}.")
    if photo.width < 1 or photo.height < 1:
        raise ValueError(f"`photo` has to have pixels, but is {photo.width}x{photo.height}.")
    left, scaled_width = photo_placement(photo.size, height, width, position, circular)
    photo = photo.convert("RGB")
    if photo.size != (scaled_width, height):
        photo = photo.resize((scaled_width, height), Image.Resampling.LANCZOS)
    image = Image.fromarray(_edge_fill(np.asarray(photo), width, left, circular))
    mask = np.full((height, width), 255, dtype=np.uint8)
    mask[:, (left + np.arange(scaled_width)) % width] = 0
    return image, Image.fromarray(mask)
