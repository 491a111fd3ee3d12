"""Procedural "shapes" source: coloured shapes on a grey background, captioned by a small grammar.

A prompt is a `ShapesSpec`: one or two object groups (count 1-3, colour, shape) and, for two groups, an
optional relation: "a green triangle", "three white squares", "a red circle and a blue square",
"two red circles above a blue square". `ShapesSpec.caption()` writes the text and `parse_caption` reads it
back, so an evaluation can take any prompt of the grammar (`micro_diffusion.eval.shapes_score`).

Images are rendered supersampled and box-downsampled (antialiased). The layout is drawn in coordinates
relative to the image side, so one (seed, index) gives the same picture at 32, 64 or 256 px. Objects sit in
disjoint grid cells with a gap between them, and the two groups of a relation in opposite halves of the
image, so every relation holds with margin. Each record keeps its ground truth in `Record.extra`:
`{"spec": spec.to_dict(), "objects": [{"colour", "shape", "centre": [x, y], "size", "group"}, ...]}` with
centre (x right, y down) and size (side of the object's square bounding box) as fractions of the image side.

A `Holdout` keeps parts of the grammar out of training, so an evaluation can ask for compositions the model never
saw: colour-shape pairs (no caption with a "blue triangle" in any group) and a share of the two-group captions
(chosen by a hash of the caption text, so the split is the same in every process and at every size).
`iter_shapes(..., holdout_pairs=[...], holdout_captions=0.15)` draws training data without them, and
`prompt_set` draws the three evaluation sets of the demo: seen single groups, held-out relation captions, and
prompts containing a held-out pair.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from micro_diffusion.data.sources.base import Record, register_source

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 230, 50),
    "magenta": (220, 60, 220),
    "cyan": (50, 220, 230),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
BACKGROUND: tuple[int, int, int] = (60, 60, 60)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")
MAX_COUNT = 3
NUM_LABELS = len(COLOURS) * len(SHAPES)
_NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}

# Layout, in fractions of the image side (or of a grid cell's short side where said).
_SUPERSAMPLE = 4
_CANVAS_MARGIN = 0.02
_SPLIT_RANGE = (0.45, 0.55)  # where the image is cut between the two groups
_CELL_PAD = 0.12  # free border kept inside each grid cell, per side, in cell short sides
_SIZE_RANGE = (0.55, 1.0 - 2 * _CELL_PAD)  # object size, in cell short sides
_MAX_SIZE = 0.45
_GRID_SLACK = 0.9  # grids whose cells are at least this fraction of the best grid's are also drawn

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1), fractions of the image side


@dataclass(frozen=True)
class ObjectGroup:
    """`count` objects of one colour and shape, e.g. (2, "red", "circle") for "two red circles"."""

    count: int
    colour: str
    shape: str

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count must be in 1..{MAX_COUNT}, got {self.count}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; known: {list(COLOURS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {list(SHAPES)}")

    def phrase(self) -> str:
        """Caption words for this group: "a red circle", "an orange square", "three blue triangles"."""
        number = _NUMBER_WORDS[self.count]
        if self.count == 1 and self.colour[0] in "aeiou":
            number = "an"
        return f"{number} {self.colour} {self.shape}{'s' if self.count > 1 else ''}"


@dataclass(frozen=True)
class ShapesSpec:
    """A prompt of the shapes grammar: one or two groups and, for two, an optional relation of the first
    group to the second ("above", "below", "left of", "right of"; None reads "and")."""

    groups: tuple[ObjectGroup, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        if len(self.groups) not in (1, 2):
            raise ValueError(f"a spec has one or two groups, got {len(self.groups)}")
        if self.relation is not None and (len(self.groups) != 2 or self.relation not in RELATIONS):
            raise ValueError(f"relation {self.relation!r} needs two groups and one of {RELATIONS}")
        kinds = {(group.colour, group.shape) for group in self.groups}
        if len(kinds) != len(self.groups):
            raise ValueError(f"the two groups must differ in colour or shape: {self.groups}")

    @property
    def category(self) -> str:
        """Prompt category of the breakdown: "single", "counting", "two_objects" or "position"."""
        if len(self.groups) == 2:
            return "two_objects" if self.relation is None else "position"
        return "single" if self.groups[0].count == 1 else "counting"

    def caption(self) -> str:
        """The prompt text, e.g. "two red circles above a blue square"."""
        phrases = [group.phrase() for group in self.groups]
        if len(phrases) == 1:
            return phrases[0]
        return f" {self.relation or 'and'} ".join(phrases)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, read back by `from_dict`."""
        groups = [{"count": g.count, "colour": g.colour, "shape": g.shape} for g in self.groups]
        return {"groups": groups, "relation": self.relation}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShapesSpec:
        return cls(tuple(ObjectGroup(**group) for group in data["groups"]), data["relation"])


def _group_pattern(tag: str) -> str:
    number = r"a|an|one|two|three"
    colour = "|".join(COLOURS)
    shape = "|".join(SHAPES)
    return rf"(?P<n{tag}>{number}) (?P<c{tag}>{colour}) (?P<s{tag}>{shape})(?P<p{tag}>s?)"


_CAPTION_RE = re.compile(
    rf"{_group_pattern('0')}(?: (?P<rel>and|{'|'.join(RELATIONS)}) {_group_pattern('1')})?"
)
_WORD_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}


def parse_caption(caption: str) -> ShapesSpec:
    """Read a prompt of the shapes grammar back into its spec (case, spacing and a final full stop are
    ignored). Raises ValueError, with an example of the grammar, for any other text."""
    text = " ".join(caption.lower().split()).rstrip(".")
    match = _CAPTION_RE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"not a shapes prompt: {caption!r}; expected '<count> <colour> <shape>' optionally followed by "
            f"'and'/{'/'.join(RELATIONS)} and a second group, e.g. 'two red circles above a blue square'"
        )
    groups = []
    for tag in ("0", "1")[: 2 if match["rel"] else 1]:
        count = _WORD_COUNTS[match[f"n{tag}"]]
        if (count > 1) != bool(match[f"p{tag}"]):
            raise ValueError(f"number and plural disagree in {caption!r}")
        groups.append(ObjectGroup(count, match[f"c{tag}"], match[f"s{tag}"]))
    relation = None if match["rel"] in (None, "and") else match["rel"]
    return ShapesSpec(tuple(groups), relation)


def spec_label(spec: ShapesSpec) -> int:
    """Class label in [0, NUM_LABELS): the index of the first group's (colour, shape)."""
    first = spec.groups[0]
    return list(COLOURS).index(first.colour) * len(SHAPES) + SHAPES.index(first.shape)


def _sample_group(rng: np.random.Generator, max_count: int) -> ObjectGroup:
    count = int(rng.integers(1, max_count + 1))
    return ObjectGroup(count, str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))


def _check_difficulty(max_groups: int, max_count: int) -> None:
    if max_groups not in (1, 2) or not 1 <= max_count <= MAX_COUNT:
        raise ValueError(
            f"need max_groups in (1, 2) and max_count in 1..{MAX_COUNT}, got {max_groups} and {max_count}"
        )


def _check_resolution(resolution: int) -> None:
    if resolution < 8:
        raise ValueError(f"resolution must be at least 8 px, got {resolution}")


def sample_spec(rng: np.random.Generator, max_groups: int = 2, max_count: int = MAX_COUNT) -> ShapesSpec:
    """Draw one spec: 1..max_groups groups of 1..max_count objects; two groups get a relation from RELATIONS
    or "and" with equal probability each."""
    _check_difficulty(max_groups, max_count)
    first = _sample_group(rng, max_count)
    if int(rng.integers(1, max_groups + 1)) == 1:
        return ShapesSpec((first,))
    second = _sample_group(rng, max_count)
    while (second.colour, second.shape) == (first.colour, first.shape):
        second = _sample_group(rng, max_count)
    relation = rng.choice([*RELATIONS, "and"])
    return ShapesSpec((first, second), None if relation == "and" else str(relation))


def _sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of sample `index`: independent of how many samples are drawn around it."""
    return np.random.default_rng([seed, index])


def sample_specs(
    num_specs: int, seed: int = 0, max_groups: int = 2, max_count: int = MAX_COUNT
) -> list[ShapesSpec]:
    """Evaluation prompts: the specs of `iter_shapes(num_specs, seed=seed, ...)`, without rendering."""
    return [sample_spec(_sample_rng(seed, index), max_groups, max_count) for index in range(num_specs)]


def sample_prompts(
    num_prompts: int, seed: int = 0, max_groups: int = 2, max_count: int = MAX_COUNT
) -> list[str]:
    """The shapes prompt set: the captions of `sample_specs(num_prompts, seed, ...)`, which `parse_caption` (and
    so the shapes score) reads back. Prompt i depends only on (seed, i)."""
    return [spec.caption() for spec in sample_specs(num_prompts, seed, max_groups, max_count)]


Pair = tuple[str, str]  # (colour, shape)


def parse_pair(text: str) -> Pair:
    """"blue triangle" -> ("blue", "triangle"); ValueError naming the known colours and shapes otherwise."""
    words = text.lower().split()
    if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES:
        raise ValueError(f"a held-out pair is '<colour> <shape>' with a colour of {list(COLOURS)} and a shape of "
                         f"{list(SHAPES)}, got {text!r}")
    return words[0], words[1]


def _unit_hash(text: str) -> float:
    """A uniform number in [0, 1) fixed by `text` alone (not Python's salted hash)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2.0**64


@dataclass(frozen=True)
class Holdout:
    """What training never sees.

    pairs: colour-shape pairs kept out of every caption (in either group).
    caption_share: the share of two-group captions kept out, chosen by a hash of the caption text.
    """

    pairs: frozenset[Pair] = frozenset()
    caption_share: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "pairs", frozenset(self.pairs))
        if not 0.0 <= self.caption_share < 1.0:
            raise ValueError(f"the held-out share of two-group captions must be in [0, 1), got {self.caption_share}")
        if len(self.pairs) >= NUM_LABELS:
            raise ValueError(f"holding out all {NUM_LABELS} colour-shape pairs leaves nothing to train on")

    @classmethod
    def from_options(cls, pairs: str | Sequence[str] | None = None, caption_share: float = 0.0) -> Holdout:
        """From config values: pairs as ["blue triangle", ...] or one comma-separated string."""
        if isinstance(pairs, str):
            pairs = [pair for pair in pairs.split(",") if pair.strip()]
        return cls(frozenset(parse_pair(pair) for pair in pairs or ()), float(caption_share))

    def has_pair(self, spec: ShapesSpec) -> bool:
        """Whether a group of `spec` is a held-out colour-shape pair."""
        return any((group.colour, group.shape) in self.pairs for group in spec.groups)

    def has_caption(self, spec: ShapesSpec) -> bool:
        """Whether `spec` is a two-group caption of the held-out share."""
        return len(spec.groups) == 2 and _unit_hash(spec.caption()) < self.caption_share

    def excludes(self, spec: ShapesSpec) -> bool:
        """Whether training must not see `spec`."""
        return self.has_pair(spec) or self.has_caption(spec)

    def describe(self) -> str:
        pairs = ", ".join(sorted(f"{colour} {shape}" for colour, shape in self.pairs)) or "none"
        return f"held-out pairs: {pairs}; held-out two-group captions: {self.caption_share:.0%}"


_MAX_DRAWS = 10_000  # rejection sampling gives up (and says why) after this many draws for one spec


def _draw_until(
    rng: np.random.Generator, accept: Callable[[ShapesSpec], bool], max_groups: int, max_count: int, what: str
) -> ShapesSpec:
    for _ in range(_MAX_DRAWS):
        spec = sample_spec(rng, max_groups, max_count)
        if accept(spec):
            return spec
    raise ValueError(f"no {what} in {_MAX_DRAWS} draws: the hold-out leaves (almost) none")


def sample_training_spec(
    rng: np.random.Generator, holdout: Holdout, max_groups: int = 2, max_count: int = MAX_COUNT
) -> ShapesSpec:
    """`sample_spec` conditioned on what `holdout` keeps out (the distribution of the rest is unchanged)."""
    return _draw_until(rng, lambda spec: not holdout.excludes(spec), max_groups, max_count,
                       "training caption outside the hold-out")


PROMPT_SETS: dict[str, str] = {
    "seen_single": "one group (1-3 objects) of a colour-shape pair seen in training",
    "held_out_relations": "two groups with a relation (above, below, left of, right of) whose caption was held out; "
                          "both pairs seen",
    "held_out_pairs": "any prompt of the grammar containing a held-out colour-shape pair (a binding never seen)",
}


def prompt_set(name: str, num_prompts: int, seed: int, holdout: Holdout) -> list[str]:
    """The evaluation prompts of set `name` (a key of PROMPT_SETS); prompt i depends only on (seed, i)."""
    accept = {
        "seen_single": lambda spec: not holdout.has_pair(spec),
        "held_out_relations": lambda spec: (spec.relation is not None and holdout.has_caption(spec)
                                            and not holdout.has_pair(spec)),
        "held_out_pairs": holdout.has_pair,
    }
    if name not in accept:
        raise ValueError(f"unknown prompt set {name!r}; known: {list(PROMPT_SETS)}")
    needs = {"held_out_pairs": holdout.pairs, "held_out_relations": holdout.caption_share}
    if name in needs and not needs[name]:
        raise ValueError(f"prompt set {name!r} needs held-out {'pairs' if name == 'held_out_pairs' else 'captions'}")
    max_groups = 1 if name == "seen_single" else 2
    return [_draw_until(_sample_rng(seed, index), accept[name], max_groups, MAX_COUNT, f"{name} prompt").caption()
            for index in range(num_prompts)]


def _group_regions(spec: ShapesSpec, rng: np.random.Generator) -> list[Box]:
    """One box per group: the whole canvas, or the two sides of a random cut (the first group on the side
    its relation names; a random side for "and")."""
    low, high = _CANVAS_MARGIN, 1.0 - _CANVAS_MARGIN
    if len(spec.groups) == 1:
        return [(low, low, high, high)]
    vertical = spec.relation in ("above", "below") or (spec.relation is None and rng.random() < 0.5)
    cut = rng.uniform(*_SPLIT_RANGE)
    if vertical:
        first_side, second_side = (low, low, high, cut), (low, cut, high, high)
    else:
        first_side, second_side = (low, low, cut, high), (cut, low, high, high)
    first_low = spec.relation in ("above", "left of") or (spec.relation is None and rng.random() < 0.5)
    return [first_side, second_side] if first_low else [second_side, first_side]


def _grid_cells(region: Box, count: int, rng: np.random.Generator) -> list[Box]:
    """`count` distinct cells of a rows x cols grid over `region`, the grid drawn among those whose cells
    are nearly as large as the largest possible."""
    x0, y0, x1, y1 = region
    grids = [(rows, cols) for rows in range(1, 4) for cols in range(1, 4) if rows * cols >= count]
    short_sides = np.array([min((x1 - x0) / cols, (y1 - y0) / rows) for rows, cols in grids])
    candidates = np.flatnonzero(short_sides >= _GRID_SLACK * short_sides.max())
    rows, cols = grids[int(rng.choice(candidates))]
    width, height = (x1 - x0) / cols, (y1 - y0) / rows
    chosen = rng.choice(rows * cols, size=count, replace=False)
    return [
        (x0 + (cell % cols) * width, y0 + (cell // cols) * height,
         x0 + (cell % cols + 1) * width, y0 + (cell // cols + 1) * height)
        for cell in chosen
    ]


def _place_in_cell(cell: Box, rng: np.random.Generator) -> tuple[float, float, float]:
    """(centre x, centre y, size) of an object inside `cell`, keeping the cell's padding free."""
    x0, y0, x1, y1 = cell
    short = min(x1 - x0, y1 - y0)
    size = min(short * rng.uniform(*_SIZE_RANGE), _MAX_SIZE)
    reach = short * _CELL_PAD + size / 2
    return rng.uniform(x0 + reach, x1 - reach), rng.uniform(y0 + reach, y1 - reach), size


def layout_objects(spec: ShapesSpec, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Ground-truth objects of one image: colour, shape, centre [x, y], size (fractions of the image side)
    and the index of their group in the spec."""
    objects = []
    for group_index, (group, region) in enumerate(zip(spec.groups, _group_regions(spec, rng))):
        for cell in _grid_cells(region, group.count, rng):
            x, y, size = _place_in_cell(cell, rng)
            objects.append({"colour": group.colour, "shape": group.shape, "centre": [float(x), float(y)],
                            "size": float(size), "group": group_index})
    return objects


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict[str, Any], scale: float) -> None:
    """Draw one object on a canvas of side `scale` pixels: circle, axis-aligned square or upright
    triangle (apex up), each filling its square bounding box."""
    x, y = obj["centre"]
    half = obj["size"] / 2
    # PIL fills both end pixels of a span: the box [left, right + 1) covers (2 * half) * scale pixels.
    left, top = (x - half) * scale, (y - half) * scale
    right, bottom = (x + half) * scale - 1, (y + half) * scale - 1
    colour = COLOURS[obj["colour"]]
    if obj["shape"] == "circle":
        draw.ellipse((left, top, right, bottom), fill=colour)
    elif obj["shape"] == "square":
        draw.rectangle((left, top, right, bottom), fill=colour)
    else:
        draw.polygon((((left + right) / 2, top), (right, bottom), (left, bottom)), fill=colour)


def render_objects(objects: list[dict[str, Any]], resolution: int) -> Image.Image:
    """Antialiased RGB image (resolution x resolution) of ground-truth objects on the background."""
    _check_resolution(resolution)
    canvas_side = resolution * _SUPERSAMPLE
    canvas = Image.new("RGB", (canvas_side, canvas_side), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        _draw_object(draw, obj, canvas_side)
    return canvas.reduce(_SUPERSAMPLE)


def render_spec(
    spec: ShapesSpec, resolution: int, rng: np.random.Generator
) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Lay out and draw `spec`: the RGB image and its ground-truth objects (see `layout_objects`)."""
    objects = layout_objects(spec, rng)
    return render_objects(objects, resolution), objects


def render_prompts(prompts: Sequence[str], resolution: int, seed: int) -> np.ndarray:
    """Ground-truth renders of grammar prompts, (N, H, W, 3) uint8; render i is laid out by (seed, i)."""
    return np.stack([np.asarray(render_spec(parse_caption(prompt), resolution, _sample_rng(seed, index))[0])
                     for index, prompt in enumerate(prompts)])


@register_source("shapes")
def iter_shapes(
    num_samples: int,
    resolution: int = 64,
    seed: int = 0,
    max_groups: int = 2,
    max_count: int = MAX_COUNT,
    holdout_pairs: str | Sequence[str] | None = None,
    holdout_captions: float = 0.0,
) -> Iterator[Record]:
    """`num_samples` captioned shapes images (arguments checked now, images drawn as iterated); sample i
    depends only on (seed, i).

    `max_groups` (1 or 2) and `max_count` (1..3) set the difficulty: (1, 1) gives single-object prompts.
    `holdout_pairs` (["blue triangle", ...] or "blue triangle,orange circle") and `holdout_captions` (a share of
    the two-group captions) are never drawn: see `Holdout`. Record.label is `spec_label(spec)` and Record.extra
    holds the spec and ground-truth objects.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    _check_resolution(resolution)
    _check_difficulty(max_groups, max_count)
    holdout = Holdout.from_options(holdout_pairs, holdout_captions)
    return _records(num_samples, resolution, seed, max_groups, max_count, holdout)


def _records(
    num_samples: int, resolution: int, seed: int, max_groups: int, max_count: int, holdout: Holdout
) -> Iterator[Record]:
    for index in range(num_samples):
        rng = _sample_rng(seed, index)
        spec = sample_training_spec(rng, holdout, max_groups, max_count)
        image, objects = render_spec(spec, resolution, rng)
        yield Record(
            key=f"shapes-{seed}-{index:08d}",
            image=image,
            caption=spec.caption(),
            label=spec_label(spec),
            extra={"spec": spec.to_dict(), "objects": objects},
        )
