"""Shapes score: check generated images against prompts of the shapes grammar (a GenEval-like breakdown,
fully offline).

Detection, vectorised over a batch:
1. Every pixel is explained as a mix of the background and one palette colour: alpha is its projection on
   the background -> colour segment and the residual its distance to that segment. A pixel belongs to the
   colour of the nearest segment when alpha > 1/2 and the residual is small, so antialiased or blurred edges
   (mixes with the background) fall on the right side of the object outline instead of forming a fringe of
   some other colour.
2. Same-colour pixels are grouped into 8-connected components; components smaller than `_MIN_AREA` of the
   image are dropped.
3. Geometry is measured at sub-pixel precision from the coverage alphas of a component and its rim: area
   (sum of alphas), box width and height (sums of the column and row maxima), centroid. The shape is the
   nearest prototype in (area / box area, centroid offset below the box centre / box height): circle
   (pi/4, 0), square (1, 0), upright triangle (1/2, 1/6); elongated components are "other".

Criteria per image (each True/False; "position" only for prompts with a relation):
    object   every named shape is present
    colour   the set of colours found equals the set named
    shape    the set of shapes found equals the set named
    count    the number of objects of each shape equals the number named (no extra objects)
    binding  the set of (colour, shape) pairs found equals the set named
    position every object of the first group lies on the named side of every object of the second
    all      the (colour, shape) pairs found, with multiplicity, are exactly those named, and position holds
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from micro_diffusion.data.sources.shapes import BACKGROUND, COLOURS, SHAPES, ShapesSpec, parse_caption

ImageBatch = torch.Tensor | Image.Image | Sequence[Image.Image]
CRITERIA = ("object", "colour", "shape", "count", "binding", "position", "all")
CATEGORIES = ("single", "counting", "two_objects", "position")

_COLOUR_NAMES = tuple(COLOURS)
_BACKGROUND_RGB = np.array(BACKGROUND, dtype=np.float32) / 255
_DIRECTIONS = np.array(list(COLOURS.values()), dtype=np.float32) / 255 - _BACKGROUND_RGB  # (K, 3)
_LENGTHS_SQ = (_DIRECTIONS**2).sum(1)  # (K,)
_RANGE_TOLERANCE = 0.01  # tensor images may leave [0, 1] by this much (then clamped); more is an error
_MAX_RESIDUAL = 0.25  # distance (RGB in [0, 1]) from a pixel to its background -> colour segment
# Coverage alpha is stretched from [slack, 1 - slack] to [0, 1]: noise on background and interior pixels
# no longer adds to or takes from an object's area and extent, while edge pixels, spread evenly around 1/2,
# keep their mean.
_COVERAGE_SLACK = 0.2
_MIN_AREA = 0.004  # of the image area; the smallest ground-truth object covers about 0.015
_MAX_ASPECT = 1.6  # components more elongated than this are not any of SHAPES
_POSITION_MARGIN = 0.05  # of the image side, between object centres along the relation's axis
# Shape prototypes in (box fill, centroid offset below the box centre / box height) space, in the order of
# SHAPES; the offset is weighted so that the triangle's two cues count alike.
_PROTOTYPES = np.array([[np.pi / 4, 0.0], [1.0, 0.0], [0.5, 1 / 6]])
_OFFSET_WEIGHT = 3.0
_RELATION_AXES = {"above": (1, -1.0), "below": (1, 1.0), "left of": (0, -1.0), "right of": (0, 1.0)}
_WITHIN_IMAGE = np.zeros((3, 3, 3), dtype=bool)
_WITHIN_IMAGE[1] = True  # 8-neighbourhood inside an image, never across the batch axis


@dataclass(frozen=True)
class DetectedObject:
    """One object found in an image. `shape` is one of SHAPES or "other"; `centre` (x, y) and `area` are
    fractions of the image side and area."""

    colour: str
    shape: str
    centre: tuple[float, float]
    area: float


def _to_batch(images: ImageBatch) -> np.ndarray:
    """PIL image(s), or a float tensor in [0, 1] of shape (B, 3, H, W) or (3, H, W) -> (B, H, W, 3)
    float32 array."""
    if isinstance(images, Image.Image):
        images = [images]
    if not isinstance(images, torch.Tensor):
        arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
        if len({array.shape for array in arrays}) != 1:
            raise ValueError("expected one or more PIL images, all of the same size")
        return np.stack(arrays)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"expected float images of shape (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
    images = images.detach().float().cpu()
    if images.numel() and (images.min() < -_RANGE_TOLERANCE or images.max() > 1 + _RANGE_TOLERANCE):
        raise ValueError(f"expected images in [0, 1], got values in [{images.min():.3f}, {images.max():.3f}]")
    return images.clamp(0.0, 1.0).permute(0, 2, 3, 1).numpy()


def _classify_pixels(images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) floats in [0, 1] -> (B, H, W) int64: index into COLOURS of each pixel, -1 for the
    background and for pixels far from every background -> colour segment."""
    offsets = images.reshape(-1, 3) - _BACKGROUND_RGB  # (P, 3)
    classes = np.full(len(offsets), -1, dtype=np.int64)
    # Pixels this close to the background have alpha < 1/2 for every colour: skip them.
    candidates = np.flatnonzero((offsets**2).sum(1) >= _LENGTHS_SQ.min() / 4)
    offsets = offsets[candidates]  # (N, 3)
    dots = offsets @ _DIRECTIONS.T  # (N, K)
    alphas = np.clip(dots / _LENGTHS_SQ, 0.0, 1.0)
    residuals_sq = (offsets**2).sum(1, keepdims=True) - alphas * (2 * dots - alphas * _LENGTHS_SQ)
    best = residuals_sq.argmin(1)
    chosen = np.arange(len(best))
    inside = (alphas[chosen, best] > 0.5) & (residuals_sq[chosen, best] < _MAX_RESIDUAL**2)
    classes[candidates] = np.where(inside, best, -1)
    return classes.reshape(images.shape[:3])


def _label_components(classes: np.ndarray, min_pixels: float) -> tuple[np.ndarray, np.ndarray]:
    """(B, H, W) class map (-1 = none) -> (labels, component_classes): labels (B, H, W) int64 numbering
    1..N the 8-connected same-class components of at least `min_pixels` pixels (0 elsewhere), and the (N,)
    class of each."""
    labels = np.zeros(classes.shape, dtype=np.int64)
    component_classes = np.zeros(1, dtype=np.int64)  # index 0: no component
    for colour in np.unique(classes[classes >= 0]):
        mask = classes == colour
        colour_labels, count = ndimage.label(mask, structure=_WITHIN_IMAGE)
        labels[mask] = colour_labels[mask] + len(component_classes) - 1
        component_classes = np.concatenate([component_classes, np.full(count, colour)])
    large = np.bincount(labels.ravel(), minlength=len(component_classes)) >= min_pixels
    large[0] = False
    renumber = np.cumsum(large) * large
    return renumber[labels], component_classes[large]


def _coverage_statistics(
    images: np.ndarray, labels: np.ndarray, colours: np.ndarray
) -> dict[str, np.ndarray]:
    """Sub-pixel geometry of components 1..N of `labels` (B, H, W), of colour indices `colours` (N,).

    A component owns its pixels and the unlabelled pixels touching it; an owned pixel counts with its
    coverage alpha (projection on the component's background -> colour segment, see `_COVERAGE_SLACK`).
    Returns (N,) arrays: image index, area, box width and height (sums of the column / row coverage
    maxima), box centre (x, y) and mean row, all in pixels.
    """
    _, height, width = labels.shape
    touching = ndimage.grey_dilation(labels, footprint=_WITHIN_IMAGE)
    owner = np.where(labels > 0, labels, touching).ravel()
    pixels = np.flatnonzero(owner)
    component, count = owner[pixels] - 1, len(colours)
    pixel_colours = colours[component]
    offsets = images.reshape(-1, 3)[pixels] - _BACKGROUND_RGB
    alpha = (offsets * _DIRECTIONS[pixel_colours]).sum(1) / _LENGTHS_SQ[pixel_colours]
    alpha = np.clip((alpha - _COVERAGE_SLACK) / (1 - 2 * _COVERAGE_SLACK), 0.0, 1.0)
    rows, cols = (pixels // width) % height, pixels % width
    row_profile, col_profile = np.zeros(count * height, alpha.dtype), np.zeros(count * width, alpha.dtype)
    np.maximum.at(row_profile, component * height + rows, alpha)
    np.maximum.at(col_profile, component * width + cols, alpha)
    row_profile, col_profile = row_profile.reshape(count, height), col_profile.reshape(count, width)
    image = np.zeros(count, dtype=np.int64)
    image[component] = pixels // (height * width)
    area = np.bincount(component, alpha, count)
    box_height, box_width = row_profile.sum(1), col_profile.sum(1)
    return {
        "image": image,
        "area": area,
        "box_width": box_width,
        "box_height": box_height,
        "centre_x": (col_profile @ (np.arange(width) + 0.5)) / box_width,
        "centre_y": (row_profile @ (np.arange(height) + 0.5)) / box_height,
        "mean_row": np.bincount(component, alpha * (rows + 0.5), count) / area,
    }


def _classify_shapes(stats: dict[str, np.ndarray]) -> list[str]:
    """Shape name (one of SHAPES, or "other" for elongated components) of each component."""
    fill = stats["area"] / (stats["box_width"] * stats["box_height"])
    offset = (stats["mean_row"] - stats["centre_y"]) / stats["box_height"]
    weights = np.array([1.0, _OFFSET_WEIGHT])
    features = np.stack([fill, offset], 1) * weights  # (N, 2)
    nearest = np.linalg.norm(features[:, None] - _PROTOTYPES * weights, axis=-1).argmin(1)
    long_side = np.maximum(stats["box_width"], stats["box_height"])
    elongated = long_side > _MAX_ASPECT * np.minimum(stats["box_width"], stats["box_height"])
    return ["other" if long else SHAPES[index] for index, long in zip(nearest, elongated)]


def detect_objects(images: ImageBatch) -> list[list[DetectedObject]]:
    """The objects found in each image of a batch ((B, 3, H, W) floats in [0, 1], or PIL images)."""
    batch = _to_batch(images)
    num_images, height, width, _ = batch.shape
    labels, colours = _label_components(_classify_pixels(batch), _MIN_AREA * height * width)
    stats = _coverage_statistics(batch, labels, colours)
    found: list[list[DetectedObject]] = [[] for _ in range(num_images)]
    for image, colour, shape, x, y, area in zip(
        stats["image"], colours, _classify_shapes(stats), stats["centre_x"], stats["centre_y"], stats["area"]
    ):
        centre, relative_area = (float(x) / width, float(y) / height), float(area) / (height * width)
        found[image].append(DetectedObject(_COLOUR_NAMES[colour], shape, centre, relative_area))
    return found


def _relation_holds(first: list[DetectedObject], second: list[DetectedObject], relation: str) -> bool:
    """Both groups found, and every object of `first` is `relation` every object of `second` by a margin."""
    axis, sign = _RELATION_AXES[relation]
    return bool(first and second) and all(
        sign * (a.centre[axis] - b.centre[axis]) > _POSITION_MARGIN for a in first for b in second
    )


def judge(objects: list[DetectedObject], spec: ShapesSpec) -> dict[str, bool]:
    """Criteria (see the module docstring) of the objects found in one image against its prompt."""
    named_pairs = Counter({(group.colour, group.shape): group.count for group in spec.groups})
    named_shapes: Counter[str] = Counter()
    for group in spec.groups:
        named_shapes[group.shape] += group.count
    found_pairs = Counter((obj.colour, obj.shape) for obj in objects)
    found_shapes = Counter(obj.shape for obj in objects)
    result = {
        "object": all(found_shapes[shape] > 0 for shape in named_shapes),
        "colour": {obj.colour for obj in objects} == {group.colour for group in spec.groups},
        "shape": set(found_shapes) == set(named_shapes),
        "count": found_shapes == named_shapes,
        "binding": set(found_pairs) == set(named_pairs),
    }
    exact = found_pairs == named_pairs
    if spec.relation is not None:
        first, second = (
            [obj for obj in objects if (obj.colour, obj.shape) == (group.colour, group.shape)]
            for group in spec.groups
        )
        result["position"] = _relation_holds(first, second, spec.relation)
        exact = exact and result["position"]
    result["all"] = exact
    return result


def _as_spec(prompt: ShapesSpec | str) -> ShapesSpec:
    return prompt if isinstance(prompt, ShapesSpec) else parse_caption(prompt)


def check_image(image: torch.Tensor | Image.Image, prompt: ShapesSpec | str) -> dict[str, bool]:
    """Criteria of one image ((3, H, W) floats in [0, 1], or PIL) against a spec or a grammar prompt."""
    return judge(detect_objects(image)[0], _as_spec(prompt))


def shapes_score(
    images: torch.Tensor | Sequence[Image.Image],
    prompts: Sequence[ShapesSpec | str],
    batch_size: int = 64,
) -> dict[str, float]:
    """GenEval-like breakdown over images and their prompts (specs or grammar captions).

    Returns the rate of each criterion over the prompts it applies to (keys of CRITERIA), the "all correct"
    rate per prompt category present (`category/<name>`, names in CATEGORIES) and `num_images`.
    """
    specs = [_as_spec(prompt) for prompt in prompts]
    if len(images) != len(specs):
        raise ValueError(f"{len(images)} images but {len(specs)} prompts")
    results = []
    for start in range(0, len(specs), batch_size):
        found = detect_objects(images[start : start + batch_size])
        results += [judge(objects, spec) for objects, spec in zip(found, specs[start : start + batch_size])]
    score: dict[str, float] = {}
    for criterion in CRITERIA:
        values = [result[criterion] for result in results if criterion in result]
        if values:
            score[criterion] = float(np.mean(values))
    for category in CATEGORIES:
        values = [result["all"] for result, spec in zip(results, specs) if spec.category == category]
        if values:
            score[f"category/{category}"] = float(np.mean(values))
    score["num_images"] = float(len(specs))
    return score
