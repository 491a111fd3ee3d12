"""The shapes score: right on ground-truth renders, tolerant of blur and noise, and each kind of wrong image
is caught by the criterion that names it."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from micro_diffusion.data.sources.shapes import (
    BACKGROUND,
    COLOURS,
    iter_shapes,
    parse_caption,
    render_objects,
)
from micro_diffusion.eval.shapes_score import CRITERIA, check_image, detect_objects, shapes_score

PROMPT = "a red circle above two blue squares"


def _obj(colour: str, shape: str, x: float, y: float, size: float = 0.22) -> dict:
    return {"colour": colour, "shape": shape, "centre": [x, y], "size": size}


def _to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) floats in [0, 1]."""
    arrays = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2)


def _blank(batch: int = 1, size: int = 64) -> torch.Tensor:
    """(batch, 3, size, size) images of the background colour."""
    background = torch.tensor(BACKGROUND, dtype=torch.float32) / 255
    return background[None, :, None, None].repeat(batch, 1, size, size)


TOP, BOTTOM = 0.25, 0.72
CIRCLE = _obj("red", "circle", 0.5, TOP)
SQUARES = [_obj("blue", "square", x, BOTTOM) for x in (0.3, 0.7)]
CORRECT = [CIRCLE, *SQUARES]  # the ground truth of PROMPT
SWAPPED_POSITION = [_obj("red", "circle", 0.5, BOTTOM), *(_obj("blue", "square", x, TOP) for x in (0.3, 0.7))]


@pytest.mark.parametrize(
    "objects, failing",
    [
        (CORRECT, set()),
        ([_obj("green", "circle", 0.5, TOP), *SQUARES], {"colour", "binding", "position", "all"}),
        ([CIRCLE, SQUARES[0]], {"count", "all"}),
        ([*CORRECT, _obj("blue", "square", 0.5, 0.5, size=0.15)], {"count", "all"}),
        (SWAPPED_POSITION, {"position", "all"}),
        ([_obj("blue", "circle", 0.5, TOP), *(_obj("red", "square", x, BOTTOM) for x in (0.3, 0.7))],
         {"binding", "position", "all"}),
        ([_obj("red", "triangle", 0.5, TOP), *SQUARES], set(CRITERIA) - {"colour"}),
        ([], set(CRITERIA)),
    ],
    ids=["correct", "wrong-colour", "missing-object", "extra-object", "swapped-position", "swapped-binding",
         "wrong-shape", "empty"],
)
def test_each_error_fails_exactly_its_criteria(objects, failing):
    result = check_image(render_objects(objects, 64), PROMPT)
    assert set(result) == set(CRITERIA)
    assert {criterion for criterion, ok in result.items() if not ok} == failing


@pytest.mark.parametrize("resolution", [32, 64])
def test_checker_is_right_on_ground_truth(resolution):
    records = list(iter_shapes(500, resolution=resolution, seed=2024))
    score = shapes_score([r.image for r in records], [r.caption for r in records])
    assert score["num_images"] == 500
    assert all(score[criterion] == 1.0 for criterion in CRITERIA), score
    assert {"category/single", "category/counting", "category/two_objects", "category/position"} <= set(score)


def test_detected_objects_match_ground_truth():
    records = list(iter_shapes(100, resolution=64, seed=31))
    for record, found in zip(records, detect_objects([r.image for r in records])):
        truth = record.extra["objects"]
        assert len(found) == len(truth), record.caption
        for obj in truth:
            nearest = min(found, key=lambda f: np.hypot(*np.subtract(f.centre, obj["centre"])))
            assert (nearest.colour, nearest.shape) == (obj["colour"], obj["shape"]), record.caption
            assert np.allclose(nearest.centre, obj["centre"], atol=1 / 64), record.caption


@functools.cache
def _ground_truth(resolution: int, max_groups: int, num_images: int) -> tuple[np.ndarray, list[str]]:
    """(B, H, W, 3) float renders in [0, 1] of the shapes source and their captions."""
    records = list(iter_shapes(num_images, resolution=resolution, seed=99, max_groups=max_groups))
    return np.stack([np.asarray(r.image, dtype=np.float32) / 255 for r in records]), [r.caption for r in records]


def _degrade(images: np.ndarray, blur: str, noise: float, amplitude: float = 1.0) -> torch.Tensor:
    """Soften (B, H, W, 3) renders like generated samples: colours pulled towards the background by
    `amplitude`, a 3x3 box blur ("box3") or a Gaussian blur ("gauss<sigma>"), then Gaussian noise of standard
    deviation `noise` (0-255 levels). Returns (B, 3, H, W) floats in [0, 1]."""
    background = np.array(BACKGROUND, dtype=np.float32) / 255
    images = background + amplitude * (images - background)
    if blur == "box3":
        images = ndimage.uniform_filter(images, size=(1, 3, 3, 1), mode="nearest")
    else:
        sigma = float(blur.removeprefix("gauss"))
        images = ndimage.gaussian_filter(images, sigma=(0, sigma, sigma, 0), mode="nearest")
    images = images + noise / 255 * np.random.default_rng(0).standard_normal(images.shape, dtype=np.float32)
    return torch.from_numpy(np.clip(images, 0, 1)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("noise", [0, 8])
@pytest.mark.parametrize("blur", ["box3", "gauss1.0", "gauss1.3"])
@pytest.mark.parametrize(
    "resolution, max_groups, num_images", [(32, 1, 150), (32, 2, 150), (64, 2, 75)],
    ids=["32px-one-group", "32px-two-groups", "64px-two-groups"],
)
def test_right_on_blurred_and_noisy_ground_truth(resolution, max_groups, num_images, blur, noise):
    """Samples have soft edges: ground truth blurred like them (and noisy) is still scored right, small
    triangles and squares included (each group of up to three objects shares half a 32 px image)."""
    images, captions = _ground_truth(resolution, max_groups, num_images)
    score = shapes_score(_degrade(images, blur, noise), captions)
    assert score["all"] >= 0.97, score


def test_tolerates_faded_colours():
    images, captions = _ground_truth(32, 2, 150)
    assert shapes_score(_degrade(images, "gauss1.0", 8, amplitude=0.85), captions)["all"] >= 0.97


@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("blur", [None, "gauss1.0"])
@pytest.mark.parametrize(
    "objects, prompt",
    [
        ([_obj("red", "circle", 0.375, 0.5, 0.25), _obj("red", "circle", 0.625, 0.5, 0.25)], "two red circles"),
        ([_obj("green", "square", 0.375, 0.375, 0.25), _obj("green", "square", 0.625, 0.625, 0.25)],
         "two green squares"),
        ([_obj("blue", "triangle", 0.375, 0.5, 0.25), _obj("blue", "triangle", 0.625, 0.5, 0.25)],
         "two blue triangles"),
        ([_obj("red", "circle", 0.375, 0.5, 0.25), _obj("blue", "square", 0.625, 0.5, 0.25)],
         "a red circle left of a blue square"),
    ],
    ids=["circles", "squares-at-a-corner", "triangles", "two-colours"],
)
def test_touching_objects_are_told_apart(objects, prompt, resolution, blur):
    """Generated samples often draw "two" as a touching pair: each object of the pair is found."""
    image = np.asarray(render_objects(objects, resolution), dtype=np.float32)[None] / 255
    images = torch.from_numpy(image).permute(0, 3, 1, 2) if blur is None else _degrade(image, blur, 0)
    assert check_image(images[0], prompt)["all"], detect_objects(images)


def test_image_formats_and_prompt_forms_agree():
    image = render_objects(CORRECT, 48)
    tensor = _to_tensor([image])
    expected = check_image(image, PROMPT)
    assert expected["all"]
    assert check_image(tensor[0], PROMPT) == expected
    assert check_image(image, parse_caption(PROMPT)) == expected
    assert detect_objects(tensor) == detect_objects([image])


def test_elongated_blob_is_no_shape():
    image = _blank()
    image[0, :, 30:36, 8:56] = torch.tensor(COLOURS["red"], dtype=torch.float32)[:, None, None] / 255
    (found,) = detect_objects(image)
    assert [(obj.colour, obj.shape) for obj in found] == [("red", "other")]
    assert not check_image(image[0], "a red square")["shape"]


def test_objects_do_not_connect_across_the_batch():
    images = _blank(batch=2)
    red = torch.tensor(COLOURS["red"], dtype=torch.float32)[:, None, None] / 255
    images[0, :, 50:64, 20:34] = red  # touches the bottom edge of image 0 ...
    images[1, :, 0:14, 20:34] = red  # ... right above the top edge of image 1
    found = detect_objects(images)
    assert [[(o.colour, o.shape) for o in objects] for objects in found] == [[("red", "square")]] * 2


def test_score_breakdown():
    images = [
        render_objects([_obj("red", "circle", 0.5, 0.5)], 64),  # "a red circle": right
        render_objects([_obj("green", "circle", 0.5, 0.5)], 64),  # "a red circle": wrong colour
        render_objects(CORRECT, 64),  # PROMPT: right
        render_objects(SWAPPED_POSITION, 64),  # PROMPT: wrong position
    ]
    prompts = ["a red circle", "a red circle", PROMPT, parse_caption(PROMPT)]
    score = shapes_score(images, prompts, batch_size=3)
    assert score == {
        "object": 1.0, "colour": 0.75, "shape": 1.0, "count": 1.0, "binding": 0.75, "position": 0.5,
        "all": 0.5, "category/single": 0.5, "category/position": 0.5, "num_images": 4.0,
    }


def test_bad_inputs_are_rejected_clearly():
    image = render_objects(CORRECT, 32)
    with pytest.raises(ValueError, match="not a shapes prompt"):
        check_image(image, "a photo of a cat")
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        shapes_score([image, image], [PROMPT])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        check_image(_to_tensor([image])[0] * 2 - 1, PROMPT)
    with pytest.raises(ValueError, match="shape"):
        detect_objects(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="same size"):
        detect_objects([image, render_objects(CORRECT, 48)])
