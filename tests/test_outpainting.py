"""`syncdiffusion_utils.outpainting.place_photo`: a photo on a panorama-sized canvas and its outpainting mask."""

import numpy as np
import pytest
from PIL import Image

from syncdiffusion_utils.outpainting import photo_placement, place_photo


def random_photo(height, width, seed=0):
    """Random RGB pixels: every column differs, so a misplaced or mirrored column shows."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def arrays(image, mask):
    assert image.mode == "RGB" and mask.mode == "L" and image.size == mask.size
    return np.asarray(image), np.asarray(mask)


@pytest.mark.parametrize("position, left", [("left", 0), ("center", 80), ("right", 160), (0, 0), (37, 37), (160, 160)])
def test_the_photo_is_placed_pixel_for_pixel(position, left):
    photo = random_photo(64, 96)
    image, mask = arrays(*place_photo(photo, 64, 256, position))
    assert image.shape == (64, 256, 3)
    np.testing.assert_array_equal(image[:, left : left + 96], np.asarray(photo))  # the same height: not resampled
    expected_mask = np.full((64, 256), 255, dtype=np.uint8)
    expected_mask[:, left : left + 96] = 0
    np.testing.assert_array_equal(mask, expected_mask)


def test_the_fill_stretches_the_photos_edge_columns():
    photo = random_photo(64, 96)
    image, _ = arrays(*place_photo(photo, 64, 256, 37))
    photo = np.asarray(photo)
    np.testing.assert_array_equal(image[:, :37], np.repeat(photo[:, :1], 37, axis=1))
    np.testing.assert_array_equal(image[:, 37 + 96 :], np.repeat(photo[:, -1:], 256 - 37 - 96, axis=1))


def test_center_splits_the_free_columns_the_odd_one_on_the_right():
    assert photo_placement((95, 64), 64, 256, "center") == (80, 95)  # 161 free: 80 left, 81 right
    assert photo_placement((96, 64), 64, 256, "center") == (80, 96)


def test_the_photo_is_scaled_to_the_panoramas_height_keeping_its_aspect_ratio():
    photo = random_photo(100, 150)  # 3:2
    image, mask = arrays(*place_photo(photo, 64, 256, "left"))
    assert photo_placement(photo.size, 64, 256, "left") == (0, 96)
    np.testing.assert_array_equal(mask[:, :96], 0)
    np.testing.assert_array_equal(mask[:, 96:], 255)
    expected = np.asarray(photo.resize((96, 64), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(image[:, :96], expected)
    # the width rounds half up: 5 x 64 / 10 = 32 exactly, 5 x 65 / 10 = 32.5 -> 33
    assert photo_placement((5, 10), 64, 256, "left")[1] == 32
    assert photo_placement((5, 10), 65, 256, "left")[1] == 33


def test_any_mode_becomes_rgb():
    photo = Image.new("L", (10, 64), 200)
    image, mask = arrays(*place_photo(photo, 64, 128, "left"))
    assert (image[:, :10] == 200).all()


def test_a_circular_photo_straddles_the_seam():
    """Column -40: the photo's first 40 columns end the canvas, its other 56 begin it."""
    photo = random_photo(64, 96)
    image, mask = arrays(*place_photo(photo, 64, 256, -40, circular=True))
    photo = np.asarray(photo)
    np.testing.assert_array_equal(image[:, 216:], photo[:, :40])
    np.testing.assert_array_equal(image[:, :56], photo[:, 40:])
    expected_mask = np.full((64, 256), 255, dtype=np.uint8)
    expected_mask[:, 216:] = expected_mask[:, :56] = 0
    np.testing.assert_array_equal(mask, expected_mask)
    assert photo_placement((96, 64), 64, 256, -40, circular=True) == (216, 96)
    # the same canvas from the positive column
    same, same_mask = arrays(*place_photo(Image.fromarray(photo), 64, 256, 216, circular=True))
    np.testing.assert_array_equal(same, image)
    np.testing.assert_array_equal(same_mask, mask)


def test_the_circular_fill_blends_the_right_edge_into_the_left_across_the_seam():
    """The gap of 160 columns from the photo's right edge (column 56) round to its left edge (column 216)."""
    photo = np.zeros((2, 96, 3), dtype=np.uint8)
    photo[:, 0] = (0, 100, 255)  # the left edge column
    photo[:, -1] = (200, 100, 0)  # the right edge column
    image, _ = arrays(*place_photo(Image.fromarray(photo), 2, 256, -40, circular=True))
    gap = image[0, 56:216].astype(np.float64)
    share = np.arange(1, 161) / 161
    for channel, (right, left) in enumerate(((200, 0), (100, 100), (0, 255))):
        np.testing.assert_array_equal(gap[:, channel], np.floor(right + (left - right) * share + 0.5))
    # one step from the right edge, one step from the left: nearly each edge's colour
    assert np.abs(image[0, 56].astype(int) - (200, 100, 0)).max() <= 2
    assert np.abs(image[0, 215].astype(int) - (0, 100, 255)).max() <= 2


def test_a_circular_photo_inside_the_canvas_is_placed_as_without_circular():
    photo = random_photo(64, 96)
    image, mask = arrays(*place_photo(photo, 64, 256, 37, circular=True))
    np.testing.assert_array_equal(image[:, 37:133], np.asarray(photo))
    assert (mask[:, 37:133] == 0).all() and (mask[:, :37] == 255).all() and (mask[:, 133:] == 255).all()


@pytest.mark.parametrize(
    "arguments, needles",
    [
        ({"photo": random_photo(64, 256)}, ["`photo` is 256x64", "256 pixels wide", "not narrower"]),
        ({"photo": random_photo(32, 200)}, ["`photo` is 200x32", "400 pixels wide"]),
        ({"photo": random_photo(1000, 1)}, ["0 pixels wide"]),
        ({"photo": np.zeros((64, 96, 3), np.uint8)}, ["`photo` has to be a PIL image", "numpy"]),
        ({"position": "middle"}, ["`position` has to be one of 'left', 'center', 'right'", "'middle'"]),
        ({"position": "80"}, ["`position`", "'80'"]),
        ({"position": True}, ["`position`", "True"]),
        ({"position": 2.5}, ["`position`", "2.5"]),
        ({"position": -1}, ["`position` -1", "0..160", "`circular`"]),
        ({"position": 161}, ["`position` 161", "0..160"]),
        ({"position": 256, "circular": True}, ["`position` 256", "-255..255"]),
        ({"position": -256, "circular": True}, ["`position` -256"]),
        ({"circular": 1}, ["`circular` has to be True or False"]),
        ({"height": 0}, ["`height` has to be a positive whole number", "0"]),
        ({"width": 256.0}, ["`width`", "256.0"]),
    ],
)
def test_bad_input_is_a_value_error_naming_the_argument(arguments, needles):
    call = {"photo": random_photo(64, 96), "height": 64, "width": 256, **arguments}
    with pytest.raises(ValueError) as error:
        place_photo(**call)
    for needle in needles:
        assert needle in str(error.value), (needle, str(error.value))
