"""The procedural shapes source: determinism, any resolution, ground truth, the caption grammar."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from micro_diffusion.data.sources.base import get_source
from micro_diffusion.data.sources.shapes import (
    BACKGROUND,
    COLOURS,
    NUM_LABELS,
    PROMPT_SETS,
    RELATIONS,
    Holdout,
    ObjectGroup,
    ShapesSpec,
    iter_shapes,
    parse_caption,
    prompt_set,
    render_objects,
    sample_prompts,
    sample_specs,
    spec_label,
)

# Area of each shape as a fraction of its square bounding box.
BOX_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}


def _pixels(record) -> np.ndarray:
    return np.asarray(record.image, dtype=np.int16)


def test_same_seed_gives_identical_records():
    first, second = list(iter_shapes(20, seed=3)), list(iter_shapes(20, seed=3))
    for a, b in zip(first, second):
        assert (a.key, a.caption, a.label, a.extra) == (b.key, b.caption, b.label, b.extra)
        assert np.array_equal(_pixels(a), _pixels(b))


def test_different_seeds_differ():
    first, second = list(iter_shapes(20, seed=0)), list(iter_shapes(20, seed=1))
    assert [r.caption for r in first] != [r.caption for r in second]
    assert all(not np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(first, second))


def test_sample_depends_only_on_seed_and_index():
    short, long = list(iter_shapes(5, seed=9)), list(iter_shapes(12, seed=9))
    assert [(r.key, r.extra) for r in short] == [(r.key, r.extra) for r in long[:5]]
    assert len({r.key for r in long}) == 12


def test_records_are_well_formed():
    for record in iter_shapes(50, resolution=48, seed=5):
        spec = parse_caption(record.caption)
        assert record.image.mode == "RGB" and record.image.size == (48, 48)
        assert record.label == spec_label(spec) and 0 <= record.label < NUM_LABELS
        assert json.loads(json.dumps(record.extra)) == record.extra
        assert ShapesSpec.from_dict(record.extra["spec"]) == spec
        counts = [sum(obj["group"] == g for obj in record.extra["objects"]) for g in range(len(spec.groups))]
        assert counts == [group.count for group in spec.groups]


@pytest.mark.parametrize("resolution", [32, 100, 256])
def test_same_layout_at_any_resolution(resolution):
    """One (seed, index) gives the same picture at every size: equal ground truth, and the large render
    box-downsampled to 32 px matches the 32 px render up to antialiasing."""
    small = list(iter_shapes(8, resolution=32, seed=2))
    other = list(iter_shapes(8, resolution=resolution, seed=2))
    for a, b in zip(small, other):
        assert a.extra == b.extra and b.image.size == (resolution, resolution)
        resized = np.asarray(b.image.resize((32, 32), resample=2), dtype=np.int16)  # bilinear, antialiased
        assert np.abs(resized - _pixels(a)).mean() < 6


def test_ground_truth_matches_pixels():
    """The pixel at every object centre has the object's colour; the area of the objects lies between the
    count of fully covered pixels and the count of pixels touched by any object."""
    palette = np.array(list(COLOURS.values()))
    for record in iter_shapes(200, resolution=64, seed=11):
        pixels = _pixels(record)
        for obj in record.extra["objects"]:
            column, row = (np.array(obj["centre"]) * 64).astype(int)
            assert tuple(pixels[row, column]) == COLOURS[obj["colour"]], record.caption
        full = (pixels[:, :, None] == palette).all(-1).any(-1).sum()
        touched = (pixels != BACKGROUND).any(-1).sum()
        area = sum(BOX_FILL[obj["shape"]] * (obj["size"] * 64) ** 2 for obj in record.extra["objects"])
        assert full <= area <= touched, record.caption


def _box(obj: dict) -> np.ndarray:
    """(x0, y0, x1, y1) of an object's bounding box, in fractions of the image side."""
    half = obj["size"] / 2
    return np.array(obj["centre"] * 2) + np.array([-half, -half, half, half])


def test_objects_are_separated_inside_the_image_and_relations_hold():
    for record in iter_shapes(300, seed=4):
        objects = record.extra["objects"]
        boxes = np.array([_box(obj) for obj in objects])
        assert (boxes[:, :2] > 0).all() and (boxes[:, 2:] < 1).all()
        for a, b in itertools.combinations(boxes, 2):
            gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
            assert gap > 0.04, record.caption  # > 1 px at 32 px
        relation = record.extra["spec"]["relation"]
        if relation is not None:
            first, second = (boxes[[obj["group"] == g for obj in objects]] for g in (0, 1))
            axis = 1 if relation in ("above", "below") else 0
            before, after = (first, second) if relation in ("above", "left of") else (second, first)
            assert before[:, axis + 2].max() < after[:, axis].min(), record.caption


def test_difficulty_knob_limits_prompts():
    specs = [parse_caption(r.caption) for r in iter_shapes(100, max_groups=1, max_count=1)]
    assert {spec.category for spec in specs} == {"single"}
    counts = {group.count for spec in sample_specs(200, max_count=2) for group in spec.groups}
    assert counts == {1, 2}
    with pytest.raises(ValueError, match="max_count"):
        sample_specs(1, max_count=4)


def test_sample_specs_are_the_prompts_of_iter_shapes():
    assert [s.caption() for s in sample_specs(30, seed=6)] == [r.caption for r in iter_shapes(30, seed=6)]


def test_sample_prompts_are_the_captions_of_iter_shapes_and_parse_back():
    prompts = sample_prompts(30, seed=6, max_groups=1)
    assert prompts == [r.caption for r in iter_shapes(30, seed=6, max_groups=1)]
    assert all(len(parse_caption(prompt).groups) == 1 for prompt in prompts)


def test_all_categories_and_relations_occur():
    specs = sample_specs(400, seed=1)
    assert {spec.category for spec in specs} == {"single", "counting", "two_objects", "position"}
    assert {spec.relation for spec in specs} == {None, *RELATIONS}


def test_caption_text():
    red_circles, blue_square = ObjectGroup(2, "red", "circle"), ObjectGroup(1, "blue", "square")
    assert ShapesSpec((red_circles, blue_square), "above").caption() == "two red circles above a blue square"
    assert ShapesSpec((ObjectGroup(1, "orange", "triangle"),)).caption() == "an orange triangle"
    assert ShapesSpec((blue_square, red_circles)).caption() == "a blue square and two red circles"
    assert ShapesSpec([blue_square]) == ShapesSpec((blue_square,))  # groups are stored as a tuple


def test_parser_round_trips_every_generated_caption():
    for spec in sample_specs(1000, seed=8):
        assert parse_caption(spec.caption()) == spec
    assert parse_caption("  Three  White Squares RIGHT OF a cyan circle. ") == ShapesSpec(
        (ObjectGroup(3, "white", "square"), ObjectGroup(1, "cyan", "circle")), "right of"
    )


@pytest.mark.parametrize(
    "caption",
    ["a purple circle", "a red circle near a blue square", "four red circles", "a photo of a red circle", ""],
)
def test_parser_rejects_text_outside_the_grammar(caption):
    with pytest.raises(ValueError, match="not a shapes prompt"):
        parse_caption(caption)


def test_parser_rejects_number_plural_mismatch():
    with pytest.raises(ValueError, match="plural"):
        parse_caption("two red circle")


@pytest.mark.parametrize(
    "groups, relation, message",
    [
        ((ObjectGroup(1, "red", "circle"),), "above", "relation"),
        ((ObjectGroup(1, "red", "circle"), ObjectGroup(2, "red", "circle")), None, "differ"),
        ((), None, "one or two groups"),
        ([ObjectGroup(1, "red", "circle"), ObjectGroup(1, "blue", "circle")], "near", "relation"),
    ],
)
def test_invalid_specs_are_rejected(groups, relation, message):
    with pytest.raises(ValueError, match=message):
        ShapesSpec(groups, relation)


@pytest.mark.parametrize(
    "count, colour, shape",
    [(4, "red", "circle"), (0, "red", "circle"), (1, "purple", "circle"), (1, "red", "star")],
)
def test_invalid_groups_are_rejected(count, colour, shape):
    with pytest.raises(ValueError):
        ObjectGroup(count, colour, shape)


def test_bad_arguments_fail_before_iteration():
    with pytest.raises(ValueError, match="resolution"):
        render_objects([], 4)
    with pytest.raises(ValueError, match="resolution"):
        iter_shapes(3, resolution=4)
    with pytest.raises(ValueError, match="max_groups"):
        iter_shapes(3, max_groups=3)
    with pytest.raises(ValueError, match="num_samples"):
        iter_shapes(-1)


def test_registered_as_source():
    assert get_source("shapes") is iter_shapes


DEMO_HOLDOUT = Holdout.from_options("blue triangle, orange circle,magenta square", 0.15)


def test_holdout_keeps_its_pairs_and_caption_share_out_of_the_data_and_leaves_the_rest_as_drawn():
    records = list(iter_shapes(600, resolution=16, seed=4, holdout_pairs=["blue triangle", "orange circle",
                                                                          "magenta square"], holdout_captions=0.15))
    specs = [parse_caption(record.caption) for record in records]
    assert not any(DEMO_HOLDOUT.excludes(spec) for spec in specs)
    assert {(g.colour, g.shape) for spec in specs for g in spec.groups} == {
        (colour, shape) for colour in COLOURS for shape in ("circle", "square", "triangle")
    } - DEMO_HOLDOUT.pairs
    # samples the hold-out accepts are drawn exactly as without it (rejection only redraws the excluded ones)
    plain = list(iter_shapes(600, resolution=16, seed=4))
    kept = [a.caption == b.caption for a, b in zip(plain, records)
            if not DEMO_HOLDOUT.excludes(parse_caption(a.caption))]
    assert kept and all(kept)
    # the caption share is a property of the text: about 15% of two-group captions, the same in every process
    two_group = sample_specs(4000, seed=5)
    share = np.mean([DEMO_HOLDOUT.has_caption(spec) for spec in two_group if len(spec.groups) == 2])
    assert 0.12 < share < 0.18
    assert not any(DEMO_HOLDOUT.has_caption(spec) for spec in two_group if len(spec.groups) == 1)


def test_prompt_sets_ask_for_what_training_never_saw():
    sets = {name: [parse_caption(p) for p in prompt_set(name, 200, 1000, DEMO_HOLDOUT)] for name in PROMPT_SETS}
    assert all(len(specs) == 200 for specs in sets.values())
    seen = sets["seen_single"]
    assert all(len(s.groups) == 1 and not DEMO_HOLDOUT.has_pair(s) for s in seen)
    assert {s.groups[0].count for s in seen} == {1, 2, 3}
    relations = sets["held_out_relations"]
    assert all(s.relation is not None and DEMO_HOLDOUT.has_caption(s) and not DEMO_HOLDOUT.has_pair(s)
               for s in relations)
    assert {s.relation for s in relations} == set(RELATIONS)
    assert all(DEMO_HOLDOUT.has_pair(s) for s in sets["held_out_pairs"])
    assert prompt_set("held_out_pairs", 20, 1000, DEMO_HOLDOUT) == [s.caption() for s in sets["held_out_pairs"][:20]]


def test_holdout_refuses_what_it_cannot_mean():
    with pytest.raises(ValueError, match="'<colour> <shape>'"):
        Holdout.from_options(["purple circle"])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Holdout.from_options([], 1.0)
    with pytest.raises(ValueError, match="needs held-out pairs"):
        prompt_set("held_out_pairs", 3, 0, Holdout())
    with pytest.raises(ValueError, match="unknown prompt set"):
        prompt_set("everything", 3, 0, DEMO_HOLDOUT)
    with pytest.raises(ValueError, match="'<colour> <shape>'"):
        iter_shapes(3, holdout_pairs="red")
