"""In-training sample quality: Frechet distance with a small N, and the shapes score when prompts are shapes.

Validation loss can rise while sample quality still improves (miniLDM saw exactly that), so checkpoints should
be chosen by what the samples look like. This callback generates a fixed set of samples (fixed prompts and
seeds, so successive evaluations compare like with like) at the end of every `every_n_evals`-th evaluation, and
logs `quality/fd_<extractor>` and `quality/shapes_<criterion>`. The reference statistics are cached per (dataset,
resolution, extractor) like `micro-diffusion eval`.

It scores the weights evaluation uses, the EMA average when an `EMA` callback is active, by swapping it in itself
(`callbacks.ema_weights_applied`): Composer runs the callbacks of an event in list order, so an EMA listed before
this callback has already swapped the raw weights back at `Event.EVAL_END`, and the callbacks' order must not
decide what is scored. Every rank generates a slice of the samples (under FSDP each forward needs all ranks); the
8-bit images are gathered and rank 0 scores them and logs.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist, model_eval_mode
from torch import Tensor, nn

from micro_diffusion.data.sources.shapes import sample_prompts
from micro_diffusion.eval.features import FeatureExtractor, get_feature_extractor
from micro_diffusion.eval.frechet import compute_image_metrics
from micro_diffusion.eval.reference import reference_statistics
from micro_diffusion.eval.shapes_score import shapes_score
from micro_diffusion.models.sampling import generate_samples
from micro_diffusion.training.callbacks import ema_weights_applied, unwrap_composer_model


class SampleQuality(Callback):
    """Generate `num_samples` images at evaluation time and log their Frechet distance and shapes score.

    Args:
        prompts: "shapes" (grammar prompts, also scored by the shapes checker) or a list of prompts (cycled).
        num_samples, batch_size, seed, steps, guidance: the sampling protocol (sample i uses seed + i).
        every_n_evals: score at every n-th evaluation (generation costs far more than the validation loss).
        reference_source / reference_options / reference_count: the reference set of the Frechet distance
            (a registered source, e.g. "shapes" with {"num_samples": 2000, "resolution": 32}); None: no FD.
        extractor / extractor_weights: the feature network of the Frechet distance.
        cache_dir: where reference statistics are cached.
    """

    def __init__(
        self,
        prompts: str | list[str] = "shapes",
        num_samples: int = 64,
        batch_size: int = 32,
        seed: int = 0,
        steps: int = 20,
        guidance: float = 3.0,
        every_n_evals: int = 1,
        reference_source: str | None = None,
        reference_options: dict | None = None,
        reference_count: int = 1000,
        extractor: str = "efficientnet-lite0",
        extractor_weights: str | None = None,
        cache_dir: str = "outputs/eval_cache",
    ) -> None:
        if num_samples < 2 or every_n_evals < 1:
            raise ValueError("SampleQuality needs num_samples >= 2 and every_n_evals >= 1")
        if prompts == "shapes":
            self.prompts = sample_prompts(num_samples, seed=seed)
        elif isinstance(prompts, str) or not prompts:
            raise ValueError(f"prompts must be 'shapes' or a non-empty list of prompts, got {prompts!r}")
        else:
            self.prompts = [prompts[i % len(prompts)] for i in range(num_samples)]
        self.score_shapes = prompts == "shapes"
        self.batch_size = batch_size
        self.seed = seed
        self.sampling = {"num_inference_steps": steps, "guidance_scale": guidance}
        self.every_n_evals = every_n_evals
        self.reference_source = reference_source
        self.reference_options = dict(reference_options or {})
        self.reference_count = reference_count
        self.extractor_name = extractor
        self.extractor_weights = extractor_weights
        self.cache_dir = Path(cache_dir)
        self._extractor: FeatureExtractor | None = None
        self._evals = 0

    def eval_end(self, state: State, logger: Logger) -> None:
        self._evals += 1
        if self._evals % self.every_n_evals:
            return
        model = unwrap_composer_model(state.model)
        with ema_weights_applied(state), model_eval_mode(model):
            images = self._generate_on_every_rank(model)
        if dist.get_global_rank() != 0:
            return
        metrics = {}
        if self.reference_source is not None:
            metrics.update(self._frechet(images, device=next(model.parameters()).device))
        if self.score_shapes:
            score = shapes_score(images, self.prompts)
            score.pop("num_images")
            metrics.update({f"quality/shapes_{name.replace('/', '_')}": value for name, value in score.items()})
        logger.log_metrics(metrics)

    def _generate_on_every_rank(self, model: nn.Module) -> Tensor:
        """All N samples (N, 3, H, W) in [0, 1], 8-bit levels, each rank generating a contiguous slice of
        ceil(N / W) of them (the last ranks pad theirs by repeating the last prompt), gathered on every rank.
        Equal slices keep the ranks' forwards in step, which FSDP's gathers of each unit need."""
        count, world_size = len(self.prompts), dist.get_world_size()
        per_rank = math.ceil(count / world_size)
        start = dist.get_global_rank() * per_rank
        prompts = [self.prompts[min(index, count - 1)] for index in range(start, start + per_rank)]
        images = generate_samples(model, prompts, self.seed + start, self.batch_size, **self.sampling)
        levels = (images * 255).round().to(torch.uint8)
        gathered = dist.all_gather_object(levels) if world_size > 1 else [levels]
        return torch.cat(gathered)[:count].float() / 255

    def _frechet(self, images, device) -> dict[str, float]:
        if self._extractor is None:
            # Built at the first scoring of this process, which a resumed run reaches at another step: its random
            # initialisation must not draw from the training's generator, or the resumed run's noise would differ.
            with torch.random.fork_rng(devices=[]):
                self._extractor = get_feature_extractor(self.extractor_name, self.extractor_weights, device=device)
        reference, _ = reference_statistics(
            self.reference_source, self.reference_options, self.reference_count, images.shape[-1],
            self._extractor, self.cache_dir, self.batch_size,
        )
        metrics = compute_image_metrics(images, reference, self._extractor, kid_subsets=0,
                                        precision_recall_neighborhood=0)
        return {f"quality/fd_{self._extractor.name}": metrics["frechet_distance"]}
