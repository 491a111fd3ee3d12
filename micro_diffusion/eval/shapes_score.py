"""Shapes score: check generated images against prompts of the shapes grammar (a GenEval-like breakdown,
fully offline).

Detection:
1. Every pixel is explained as a mix of the background and one palette colour: alpha is its projection on
   the background -> colour segment and the residual its distance to that segment. A pixel belongs to the
   colour of the nearest segment when alpha > 1/2 and the residual is small, so antialiased or blurred edges
   (mixes with the background) fall on the right side of the object outline instead of forming a fringe of
   some other colour.
2. Same-colour pixels are grouped into 8-connected components; components smaller than `_MIN_AREA` of the
   image are dropped. A component with several cores (parts far from its outline joined by a narrow neck)
   is that many touching objects and is split between them.
3. Each component is fitted in a window: its pixels and those within `_WINDOW_MARGIN` pixels that lie nearer
   to it than to any other component, where blurred edges fade out. Blur keeps an object's mass (sum of
   alphas: its area) and centroid, so for each shape these give the object's size and box; the shape is the
   one whose template (drawn at sub-pixel precision, then blurred by each of `_BLUR_SIGMAS`, at sizes around
   the one implied) best matches the window's alphas up to a scale (cosine similarity). Components more
   elongated than `_MAX_ASPECT` (ratio of the principal axes of their alpha moments) are "other".

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

import functools
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
_MIN_AREA = 0.004  # of the image area; the smallest ground-truth object covers about 0.015
_MAX_ASPECT = 1.6  # components more elongated than this are not any of SHAPES
_POSITION_MARGIN = 0.05  # of the image side, between object centres along the relation's axis
# Touching objects: the pixels of a component deeper (distance to its outline) than this fraction of its
# deepest pixel's depth, and than _MIN_CORE_DEPTH pixels, form its cores; disconnected cores are objects.
_CORE_DEPTH = 0.7
_MIN_CORE_DEPTH = 1.5
_WINDOW_MARGIN = 3  # pixels around a component that its fit sees: where blurred edges fade out
_MAX_WINDOW = 32  # windows larger than this (pixels) are block-averaged down to it before fitting
# Templates, in the order of SHAPES: each shape fills this fraction of its square box, and its centroid lies
# this far below the box centre (in box sides). Sub-pixel rows per pixel row (columns are covered exactly).
_FILLS = np.array([np.pi / 4, 1.0, 0.5])
_CENTROID_OFFSETS = np.array([0.0, 0.0, 1 / 6])
_SUBROWS = 4
_BLUR_SIGMAS = (0.0, 0.5, 0.8, 1.1, 1.4, 1.7)  # Gaussian blurs (pixels) tried on each template
_SIZE_FACTORS = np.array([0.88, 0.94, 1.0, 1.06, 1.12])  # around the size implied by area; absorbs colour drift
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


def _split_touching(component: np.ndarray, min_pixels: float) -> np.ndarray:
    """(h, w) bool mask of one component -> (h, w) int64: 1..n for the n touching objects it holds (one piece
    per core of at least `min_pixels` pixels, every pixel going to the nearest core), 0 outside."""
    depth = ndimage.distance_transform_edt(np.pad(component, 1))[1:-1, 1:-1]
    threshold = max(_CORE_DEPTH * depth.max(), _MIN_CORE_DEPTH)
    cores, count = ndimage.label(depth >= threshold, structure=np.ones((3, 3)))
    for _ in range(2):  # second pass: keep only the cores whose piece is large enough
        if count < 2:
            return component.astype(np.int64)
        _, (rows, cols) = ndimage.distance_transform_edt(cores == 0, return_indices=True)
        pieces = np.where(component, cores[rows, cols], 0)
        large = np.bincount(pieces.ravel(), minlength=count + 1) >= min_pixels
        large[0] = False
        renumber = np.cumsum(large) * large
        cores, count = renumber[cores], int(large.sum())
    return renumber[pieces]


def _label_objects(classes: np.ndarray, min_pixels: float) -> tuple[np.ndarray, np.ndarray]:
    """(B, H, W) class map (-1 = none) -> (labels, colours): labels (B, H, W) int64 numbering 1..N the
    objects (8-connected same-class components of at least `min_pixels` pixels, touching objects split), 0
    elsewhere, and the (N,) class of each."""
    components, component_classes = _label_components(classes, min_pixels)
    labels = np.zeros_like(components)
    colours = []
    for index, box in enumerate(ndimage.find_objects(components)):
        pieces = _split_touching(components[box][0] == index + 1, min_pixels)
        labels[box][0] += np.where(pieces > 0, pieces + len(colours), 0)
        colours += [component_classes[index]] * int(pieces.max())
    return labels, np.array(colours, dtype=np.int64)


def _fit_windows(labels: np.ndarray) -> np.ndarray:
    """(B, H, W) object labels -> owners (B, H, W): the label of the object each pixel within
    `_WINDOW_MARGIN` pixels of an object is nearest to (its own label on the object), 0 elsewhere."""
    owners = np.zeros_like(labels)
    for image, image_labels in enumerate(labels):
        if image_labels.any():
            distance, (rows, cols) = ndimage.distance_transform_edt(image_labels == 0, return_indices=True)
            owners[image] = np.where(distance <= _WINDOW_MARGIN, image_labels[rows, cols], 0)
    return owners


@functools.lru_cache(maxsize=2 * _MAX_WINDOW)
def _blur_matrices(size: int) -> np.ndarray:
    """(len(_BLUR_SIGMAS), size, size): row i of matrix s holds the weights of the Gaussian of standard
    deviation _BLUR_SIGMAS[s] (truncated at 4 sigma, normalised) centred on pixel i; identity for sigma 0."""
    distance = np.arange(size)[:, None] - np.arange(size)[None]
    matrices = []
    for sigma in _BLUR_SIGMAS:
        if sigma == 0:
            matrices.append(np.eye(size))
            continue
        radius = int(4 * sigma + 0.5)
        norm = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).sum()
        matrices.append(np.where(np.abs(distance) <= radius, np.exp(-0.5 * (distance / sigma) ** 2) / norm, 0.0))
    return np.stack(matrices)


def _draw_templates(shape: int, centre_x: float, centre_y: np.ndarray, sizes: np.ndarray, height: int,
                    width: int) -> np.ndarray:
    """Coverage (F, height, width) of shape SHAPES[shape] in square boxes of sides `sizes` (F,) centred at
    (centre_x, centre_y[f]), pixel units with pixel (i, j) spanning [j, j + 1) x [i, i + 1): each row of
    pixels is cut into _SUBROWS strips whose span inside the shape is covered exactly."""
    strips = (np.arange(height * _SUBROWS) + 0.5) / _SUBROWS
    below_centre = strips[None] - centre_y[:, None]  # (F, strips)
    half = sizes[:, None] / 2
    if SHAPES[shape] == "circle":
        half_width = np.sqrt(np.clip(half**2 - below_centre**2, 0.0, None))
    elif SHAPES[shape] == "square":
        half_width = np.where(np.abs(below_centre) <= half, half, 0.0)
    else:  # upright triangle: apex at the top centre, base along the bottom
        below_apex = below_centre + half
        half_width = np.where((below_apex >= 0) & (below_apex <= 2 * half), below_apex / 2, 0.0)
    left, right = (centre_x + sign * half_width[..., None] for sign in (-1, 1))  # (F, strips, 1)
    columns = np.arange(width)
    covered = np.clip(np.minimum(columns + 1, right) - np.maximum(columns, left), 0.0, None)
    return covered.reshape(len(sizes), height, _SUBROWS, width).mean(2)


def _block_average(window: np.ndarray, factor: int) -> np.ndarray:
    """(h, w) -> (ceil(h / factor), ceil(w / factor)) means of factor x factor blocks (zero-padded)."""
    height, width = (-(-side // factor) for side in window.shape)
    padded = np.zeros((height * factor, width * factor))
    padded[: window.shape[0], : window.shape[1]] = window
    return padded.reshape(height, factor, width, factor).mean((1, 3))


def _fit_shape(alpha: np.ndarray, weight: np.ndarray) -> tuple[str, tuple[float, float], float]:
    """Shape of the object whose coverage `alpha` (h, w) is seen where `weight` (h, w, 0 or 1) is set; its box
    centre (x, y) in window pixels and its area in pixels (see the module docstring, step 3)."""
    seen = alpha * weight
    area = max(float(seen.sum()), 1e-6)
    rows, cols = np.arange(seen.shape[0]) + 0.5, np.arange(seen.shape[1]) + 0.5
    centre_x, centre_y = seen.sum(0) @ cols / area, seen.sum(1) @ rows / area
    offsets_x, offsets_y = cols[None] - centre_x, rows[:, None] - centre_y
    moments = [(seen * a * b).sum() / area for a, b in ((offsets_x, offsets_x), (offsets_x, offsets_y),
                                                        (offsets_y, offsets_y))]
    minor, major = np.linalg.eigvalsh([[moments[0], moments[1]], [moments[1], moments[2]]])
    if minor <= 0 or major > _MAX_ASPECT**2 * minor:
        return "other", (centre_x, centre_y), area
    factor = -(-max(seen.shape) // _MAX_WINDOW)
    if factor > 1:
        seen, weight = _block_average(seen, factor), _block_average(weight, factor)
    height, width = seen.shape
    sizes = np.sqrt(area / _FILLS)[:, None] * _SIZE_FACTORS / factor  # (shapes, F)
    box_centres_y = centre_y / factor - _CENTROID_OFFSETS[:, None] * sizes
    templates = np.concatenate([
        _draw_templates(shape, centre_x / factor, box_centres_y[shape], sizes[shape], height, width)
        for shape in range(len(SHAPES))
    ])  # (shapes * F, h, w)
    blurred = _blur_matrices(height)[:, None] @ templates @ _blur_matrices(width).transpose(0, 2, 1)[:, None]
    blurred *= weight
    norms = np.sqrt((blurred**2).sum((-2, -1)))
    similarity = (blurred * seen).sum((-2, -1)) / np.maximum(norms, 1e-12)  # (sigmas, shapes * F)
    similarity = similarity.reshape(len(_BLUR_SIGMAS), len(SHAPES), -1)
    shape = int(similarity.max((0, 2)).argmax())
    size = sizes[shape, similarity[:, shape].max(0).argmax()] * factor
    return SHAPES[shape], (centre_x, centre_y - _CENTROID_OFFSETS[shape] * size), area


def detect_objects(images: ImageBatch) -> list[list[DetectedObject]]:
    """The objects found in each image of a batch ((B, 3, H, W) floats in [0, 1], or PIL images)."""
    batch = _to_batch(images)
    num_images, height, width, _ = batch.shape
    labels, colours = _label_objects(_classify_pixels(batch), _MIN_AREA * height * width)
    owners = _fit_windows(labels)
    found: list[list[DetectedObject]] = [[] for _ in range(num_images)]
    for index, box in enumerate(ndimage.find_objects(owners)):
        colour = colours[index]
        alpha = (batch[box][0] - _BACKGROUND_RGB) @ _DIRECTIONS[colour] / _LENGTHS_SQ[colour]
        shape, (x, y), area = _fit_shape(alpha, (owners[box][0] == index + 1).astype(np.float64))
        centre = ((x + box[2].start) / width, (y + box[1].start) / height)
        found[box[0].start].append(DetectedObject(_COLOUR_NAMES[colour], shape, centre, area / (height * width)))
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


def shapes_tally(
    images: torch.Tensor | Sequence[Image.Image],
    prompts: Sequence[ShapesSpec | str],
    batch_size: int = 64,
) -> Counter[str]:
    """Counts over images and their prompts (specs or grammar captions), which add up over batches and processes:
    `<criterion>/correct` and `<criterion>/total` per criterion that applies (keys of CRITERIA),
    `category/<name>/correct` and `/total` per prompt category (names in CATEGORIES), and `num_images`."""
    specs = [_as_spec(prompt) for prompt in prompts]
    if len(images) != len(specs):
        raise ValueError(f"{len(images)} images but {len(specs)} prompts")
    tally: Counter[str] = Counter(num_images=len(specs))
    for start in range(0, len(specs), batch_size):
        found = detect_objects(images[start : start + batch_size])
        for objects, spec in zip(found, specs[start : start + batch_size]):
            result = judge(objects, spec)
            for name, correct in [*result.items(), (f"category/{spec.category}", result["all"])]:
                tally[f"{name}/correct"] += int(correct)
                tally[f"{name}/total"] += 1
    return tally


def summarise_shapes(tally: Counter[str]) -> dict[str, float]:
    """The rates of a `shapes_tally`: each criterion's over the prompts it applies to, the "all correct" rate per
    prompt category present (`category/<name>`), and `num_images`."""
    names = [*CRITERIA, *(f"category/{category}" for category in CATEGORIES)]
    score = {name: tally[f"{name}/correct"] / tally[f"{name}/total"] for name in names if tally[f"{name}/total"]}
    score["num_images"] = float(tally["num_images"])
    return score


def shapes_score(
    images: torch.Tensor | Sequence[Image.Image],
    prompts: Sequence[ShapesSpec | str],
    batch_size: int = 64,
) -> dict[str, float]:
    """GenEval-like breakdown over images and their prompts (specs or grammar captions).

    Returns the rate of each criterion over the prompts it applies to (keys of CRITERIA), the "all correct"
    rate per prompt category present (`category/<name>`, names in CATEGORIES) and `num_images`.
    """
    return summarise_shapes(shapes_tally(images, prompts, batch_size))
