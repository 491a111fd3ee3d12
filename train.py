"""Train from a Hydra config with Composer (one process, or one per GPU under the Composer launcher).

    composer train.py --config-path ./configs --config-name res_256_pretrain.yaml \\
        exp_name=MicroDiTXL_mask_75_res_256_pretrain model.train_mask_ratio=0.75
    composer -n 2 train.py --config-path ./configs --config-name tiny_res_16_pretrain.yaml data.datadir=...

The config is validated first (`micro_diffusion.training.config`): an unknown key, a key of the wrong type or
a key that would have no effect stops the run with its dotted path. The task named by `task` then builds the
model and data (`micro_diffusion.training.tasks`); this script builds the rest from the generic sections:
the optimiser and schedule (`training.optim`), algorithms (gradient clipping, low-precision LayerNorm),
callbacks, loggers and the Composer Trainer, and calls `fit()`. Evaluation runs at `trainer.eval_interval`
whether or not the training forward is compiled.
"""

from __future__ import annotations

# First, before the slow imports: a worker notes its launcher's pid (launcher_watchdog) while the launcher lives.
from micro_diffusion.training import launcher_watchdog  # isort: skip

import re
import warnings
from dataclasses import asdict
from typing import Any

import hydra
from composer import Trainer
from composer.algorithms import GradientClipping
from composer.core import Algorithm, Callback, State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist, get_device, module_surgery, reproducibility
from omegaconf import DictConfig
from torch import nn

from micro_diffusion.compat import low_precision_layernorm_class, take_pending_rng_state
from micro_diffusion.config_checks import ConfigError, check_arguments
from micro_diffusion.models.regional_compile import compile_regions
from micro_diffusion.training import safe_checkpoint
from micro_diffusion.training.config import RunConfig, call_with, load_run_config, pick, trainer_arguments
from micro_diffusion.training.optim import SCHEDULERS, build_adamw
from micro_diffusion.training.registry import CALLBACKS, LOGGERS, configured_entries
from micro_diffusion.training.resume import prepare_resume
from micro_diffusion.training.task_components import TaskComponents
from micro_diffusion.training.tasks import TASK_CHECKS, TASKS


def fail_on_unmatched_ignore_keys() -> None:
    """Make Composer's warning about a `load_ignore_keys` pattern that matches nothing an error: such a key does
    nothing (the original's optimizer `lr` patterns never matched, as param_groups is a list)."""
    warnings.filterwarnings("error", message="No parts from loaded checkpoint state_dict were ignored")


def callback_entries(run: RunConfig) -> list[tuple[str, Any, dict]]:
    """`configured_entries` of the `callbacks` section, with points and intervals given in images ("256000sp")
    turned into batches of the global batch `data.train_batch_size` (our callbacks count optimizer steps)."""
    global_batch = run.data.get("train_batch_size")
    return [
        (path, target, {key: images_to_batches(value, global_batch, f"{path}.{key}") for key, value in args.items()})
        for path, target, args in configured_entries(run.callbacks, CALLBACKS, "callbacks")
    ]


def images_to_batches(value: Any, global_batch: int | None, path: str) -> Any:
    """"<n>sp" -> "<n / global_batch>ba"; any other value unchanged. n must be a whole number of batches."""
    match = re.fullmatch(r"\s*(\d+)\s*sp\s*", value) if isinstance(value, str) else None
    if match is None:
        return value
    if not global_batch:
        raise ConfigError(f"{path}: {value!r} counts images, but data.train_batch_size (the global batch) is not set")
    images = int(match.group(1))
    if images % global_batch:
        raise ConfigError(f"{path}: {value!r} is not a whole number of batches of {global_batch} images")
    return f"{images // global_batch}ba"


def scheduler_entry(run: RunConfig) -> tuple[type, dict]:
    """The scheduler class named by `scheduler.name` and its arguments (the rest of the section)."""
    arguments = dict(run.scheduler)
    name = arguments.pop("name", None)
    if name is None:
        raise ConfigError(f"scheduler.name: required, one of {', '.join(sorted(SCHEDULERS))}")
    return pick(SCHEDULERS, name, "scheduler.name"), arguments


def check_run(run: RunConfig) -> None:
    """Check every section that can be checked without building anything, so a typo fails in seconds and not
    after a large model has loaded: the task's own sections (where the task offers a static check), the
    scheduler, and each callback's and logger's arguments."""
    pick(TASKS, run.task, "task")
    if run.task in TASK_CHECKS:
        TASK_CHECKS[run.task](run)
    check_arguments(*scheduler_entry(run), "scheduler")
    for path, target, arguments in [*callback_entries(run), *configured_entries(run.logger, LOGGERS, "logger")]:
        check_arguments(target, arguments, path)


def build_algorithms(run: RunConfig, model: nn.Module) -> list[Algorithm]:
    """Composer algorithms; low-precision LayerNorm is applied here, to trainable LayerNorms only."""
    if run.algorithms.low_precision_layernorm:
        apply_low_precision_layernorm(model)
    clipping = run.algorithms.gradient_clipping
    if clipping is None:
        return []
    return [GradientClipping(clipping_type=clipping.clipping_type, clipping_threshold=clipping.clipping_threshold)]


def apply_low_precision_layernorm(model: nn.Module) -> int:
    """Replace every LayerNorm whose parameters train with Composer's LPLayerNorm (runs in the autocast dtype).

    Frozen encoders are left alone: their norms would otherwise get fresh trainable parameters. Done before
    the optimiser exists, so no optimiser surgery is needed. Returns the number of layers replaced.
    """

    lp_layernorm = low_precision_layernorm_class()

    def low_precision(layer: nn.Module, index: int) -> nn.Module | None:
        if any(not p.requires_grad for p in layer.parameters()):
            return None
        replacement = lp_layernorm(layer.normalized_shape, layer.eps, layer.elementwise_affine)
        if layer.elementwise_affine and layer.bias is None:
            replacement.register_parameter("bias", None)
        replacement.load_state_dict(layer.state_dict())
        return replacement

    replaced = module_surgery.replace_module_classes(model, {nn.LayerNorm: low_precision})
    if not replaced:
        raise ConfigError("algorithms.low_precision_layernorm: the model has no trainable LayerNorm")
    return len(replaced)


def build_trainer(run: RunConfig, components: TaskComponents) -> Trainer:
    """The Composer Trainer of a validated run, with the model and data of its task."""
    settings = run.trainer
    has_eval = components.eval_dataloader is not None
    if has_eval != (settings.eval_interval is not None):
        raise ConfigError(
            "trainer.eval_interval: set it when the task has evaluation data, and only then "
            f"(evaluation data: {'yes' if has_eval else 'no'}, eval_interval: {settings.eval_interval})"
        )
    algorithms = build_algorithms(run, components.model)  # before the optimiser: it may replace LayerNorms
    optimizer = build_adamw(components.model, **asdict(run.optimizer))
    scheduler = call_with(*scheduler_entry(run), "scheduler")
    callbacks = [call_with(target, arguments, path) for path, target, arguments in callback_entries(run)]
    loggers = [call_with(target, arguments, path) for path, target, arguments in
               configured_entries(run.logger, LOGGERS, "logger")]
    evaluation = dict(eval_dataloader=components.eval_dataloader) if has_eval else {}
    arguments = trainer_arguments(settings, has_eval)
    if settings.compile and compile_regions(components.model):
        arguments["compile_config"] = None  # compiled region by region, not as one graph by Composer
    return Trainer(
        model=components.model,
        train_dataloader=components.train_dataloader,
        **evaluation,
        optimizers=optimizer,
        schedulers=scheduler,
        algorithms=algorithms,
        callbacks=[*components.callbacks, *callbacks],
        loggers=loggers,
        run_name=run.exp_name,
        seed=run.seed,
        **arguments,
    )


class _RestoreRngAtFirstBatch(Callback):
    """Loads saved RNG states once, when the first batch of the fit has been fetched (see `keep_rng_of_resume`)."""

    def __init__(self, rng_state: list[dict]) -> None:
        self.rng_state: list[dict] | None = rng_state

    def after_dataloader(self, state: State, logger: Logger) -> None:
        if self.rng_state is not None:
            reproducibility.load_rng_state(self.rng_state)
            self.rng_state = None


def keep_rng_of_resume(trainer: Trainer) -> None:
    """Continue a resumed checkpoint's random streams where Composer would drop them.

    Composer 0.32 restores a checkpoint's RNG state only at an epoch boundary, or while it spins the dataloader
    forward to the saved batch. A dataset that resumes itself mid-epoch (Streaming) is not spun, so the state
    was silently dropped and a resumed run redrew the noise levels, noise and patch masks of the run's first
    batches. The state is loaded after the first batch is fetched, as Composer does when it spins: creating
    a DataLoader iterator draws a seed from the global generator, which the uninterrupted run did before the
    checkpoint was taken.
    """
    resumes_mid_epoch = "train" in trainer.state.dataset_resumption and int(trainer.state.timestamp.batch_in_epoch)
    if resumes_mid_epoch:
        rng_state = take_pending_rng_state(trainer)
        if rng_state is not None:
            trainer.state.callbacks.append(_RestoreRngAtFirstBatch(rng_state))


def describe(run: RunConfig, trainer: Trainer) -> str:
    """One line per fact a user should see before a long run: what trains, on what, logged where."""
    model = trainer.state.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    loggers = ", ".join(type(d).__name__ for d in trainer.logger.destinations) or "none"
    callbacks = ", ".join(
        type(c).__name__ for c in trainer.state.callbacks if not isinstance(c, LoggerDestination)
    )
    return "\n".join([
        f"[train] {run.exp_name}: task {run.task}, {trainable / 1e6:.2f}M trainable parameters, "
        f"{dist.get_world_size()} process(es), seed {run.seed}",
        f"[train] loggers: {loggers}; callbacks: {callbacks}",
        f"[train] checkpoints: {run.trainer.save_folder} every {run.trainer.save_interval}; "
        f"evaluation: {run.trainer.eval_interval or 'off'}; compile: {run.trainer.compile}",
    ])


def resume_from_a_complete_checkpoint(run: RunConfig) -> None:
    """Point the save folder's latest link at its newest complete checkpoint, setting aside any checkpoint cut
    short (`training.resume.prepare_resume`), on rank 0 before Composer's autoresume reads the link."""
    if dist.get_global_rank() == 0:
        for note in prepare_resume(run.trainer.save_folder, run.exp_name):
            print(f"[train] autoresume: {note}", flush=True)
    dist.barrier()


def train(run: RunConfig) -> Trainer:
    """Build everything for a validated run and fit. Returns the trainer (closed)."""
    launcher_watchdog.exit_with_launcher()  # a worker must not outlive a killed launcher
    safe_checkpoint.install()  # every checkpoint the trainer reads goes through a weights-only load
    fail_on_unmatched_ignore_keys()
    check_run(run)
    # One process group for the whole run, before the data: Streaming would otherwise set up and tear down
    # its own for every dataset it builds.
    dist.initialize_dist(get_device(run.trainer.device))
    if run.trainer.autoresume:
        resume_from_a_complete_checkpoint(run)
    reproducibility.seed_all(run.seed)
    components = TASKS[run.task](run)
    trainer = build_trainer(run, components)
    keep_rng_of_resume(trainer)
    if dist.get_global_rank() == 0:
        print(describe(run, trainer), flush=True)
    duration = trainer.state.max_duration
    if duration is not None and trainer.state.timestamp.get(duration.unit) >= duration:
        # A rerun of a finished run resumes at its end: nothing to train (Composer's fit would raise).
        if dist.get_global_rank() == 0:
            print(f"[train] {run.exp_name} already trained for {duration}: nothing to do", flush=True)
        trainer.close()
        return trainer
    trainer.fit()
    trainer.close()
    return trainer


@hydra.main(version_base=None, config_path="configs", config_name=None)
def main(cfg: DictConfig) -> None:
    try:
        run = load_run_config(cfg)
        check_run(run)
    except ConfigError as error:
        raise SystemExit(f"train.py: configuration error: {error}") from None
    train(run)


if __name__ == "__main__":
    main()
