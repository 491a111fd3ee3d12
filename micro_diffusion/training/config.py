"""The training configuration: schemas of every section, and the check that every key set is used.

A composed Hydra config is validated before anything is built:

- the sections `train.py` consumes itself (optimizer, algorithms, trainer, ...) against the dataclass schemas
  below: a key that is not a schema field raises, a value of the wrong type raises;
- sections whose keys are the arguments of one function or class (`model` for the task's model factory,
  `scheduler`, each entry of `callbacks` and `logger`) against that callable's signature;
- the task's own sections (`model`, `data`) by the task builder, with the same two helpers.

Keys that only make sense together are checked together (`consistency_errors`): e.g. `load_ignore_keys`
without a `load_path`, or low-precision LayerNorm without mixed precision (train.py adds the checks that need
the built task, such as an evaluation interval without evaluation data). Every error names the dotted path
of the key. The original code printed "not supported" for an `ema` block and carried on; here a key that
would do nothing stops the run before it starts.
"""

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

Schema = TypeVar("Schema")


class ConfigError(ValueError):
    """A configuration key that is unknown, of the wrong type, missing, or set without effect."""


# ----------------------------------------------------------------------------------------------------------------
# Schemas of the sections train.py consumes
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class OptimizerConfig:
    """AdamW (fused) over `micro_diffusion.training.optim.parameter_groups`.

    decay_all: apply weight decay to norms, biases and embeddings too (what the original did); by default
        they are not decayed.
    moe_lr_scale: learning-rate multiplier of the expert-choice MoE parameters (expert weights and router).
    """

    lr: float = MISSING
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    moe_lr_scale: float = 1.0
    decay_all: bool = False


@dataclass
class GradientClippingConfig:
    """Composer's GradientClipping: clipping_type "norm", "value" or "adaptive"."""

    clipping_type: str = "norm"
    clipping_threshold: float = MISSING


@dataclass
class AlgorithmsConfig:
    """gradient_clipping: null for none. low_precision_layernorm: run the trainable LayerNorms in the autocast
    dtype (needs trainer.precision amp_bf16 or amp_fp16)."""

    gradient_clipping: GradientClippingConfig | None = None
    low_precision_layernorm: bool = False


@dataclass
class TrainerConfig:
    """Arguments of the Composer Trainer (same names), plus `compile` and `fsdp_config`.

    eval_interval: null when the task has no evaluation data; evaluation runs at this interval otherwise,
        with or without `compile`.
    compile: torch.compile the training forward (Composer `compile_config={}`).
    fsdp_config: Composer FSDP options (e.g. sharding_strategy SHARD_GRAD_OP, activation_checkpointing);
        null for DDP. (Typed Any: OmegaConf cannot merge a mapping into an Optional[Dict] that is null.)
    console_log_interval: print metrics to the console at this interval; null for the progress bar only.
    """

    device: str = "gpu"
    precision: str = "amp_bf16"
    max_duration: str = MISSING
    device_train_microbatch_size: Any = None
    eval_interval: str | None = None
    eval_subset_num_batches: int = -1
    save_folder: str = MISSING
    save_interval: str = "1ep"
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    autoresume: bool = False
    load_path: str | None = None
    load_weights_only: bool = False
    load_strict_model_weights: bool = True
    load_ignore_keys: list[str] | None = None
    compile: bool = False
    fsdp_config: Any = None
    progress_bar: bool = True
    console_log_interval: str | None = None


@dataclass
class RunConfig:
    """A training run. `task` selects the builder of model and data (`micro_diffusion.training.tasks.TASKS`).

    model, data: the task's sections, validated by the task builder.
    scheduler: `name` (a key of `optim.SCHEDULERS`) and that scheduler's arguments.
    callbacks, logger: name -> arguments of that callback / logger (null disables an entry).
    """

    exp_name: str = MISSING
    seed: int = MISSING
    task: str = "diffusion"
    model: dict[str, Any] = MISSING
    data: dict[str, Any] = MISSING
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: dict[str, Any] = MISSING
    algorithms: AlgorithmsConfig = field(default_factory=AlgorithmsConfig)
    callbacks: dict[str, Any] = field(default_factory=dict)
    logger: dict[str, Any] = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


SCHEMA_NAME = "run_schema"
# Configs list the schema first in their defaults (configs/base/hydra.yaml), so every key it defines can be
# overridden from the command line without a "+", and `--cfg job` shows the defaults.
ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)


# ----------------------------------------------------------------------------------------------------------------
# Validation helpers (also for task builders)
# ----------------------------------------------------------------------------------------------------------------


def validate_section(schema: type[Schema], values: Mapping[str, Any] | DictConfig, path: str = "") -> Schema:
    """`values` checked against the dataclass `schema` (no unknown keys, types converted, nothing missing)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = ".".join(part for part in (path, str(getattr(error, "full_key", "") or "")) if part)
        reason = str(error).splitlines()[0]
        raise ConfigError(f"{key or '<root>'}: {reason}") from None


def check_arguments(target: Callable, arguments: Mapping[str, Any], path: str) -> None:
    """Raise a ConfigError naming `path.<key>` for a key that is not an argument of `target`, or for a
    required argument that is missing. A target that takes **kwargs cannot be checked and is refused."""
    parameters = _keyword_parameters(target, path)
    unknown = sorted(set(arguments) - set(parameters))
    if unknown:
        raise ConfigError(
            f"{path}.{unknown[0]}: unknown key; {_name(target)} takes {', '.join(sorted(parameters)) or 'nothing'}"
        )
    missing = [name for name, p in parameters.items() if p.default is p.empty and name not in arguments]
    if missing:
        raise ConfigError(f"{path}.{missing[0]}: required by {_name(target)} but not set")


def _keyword_parameters(target: Callable, path: str) -> dict[str, inspect.Parameter]:
    """The arguments `target` can take by keyword. Classes that inherit Composer's `Callback.__init__` (a stub
    that swallows any argument) take none."""
    from composer.core import Callback  # imported here: composing and validating a config needs no Composer

    if inspect.isclass(target) and target.__init__ in (object.__init__, Callback.__init__):
        return {}
    signature = inspect.signature(target)
    if any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
        raise TypeError(f"{path}: {_name(target)} takes **kwargs, so its configuration keys cannot be checked")
    return {
        name: p for name, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name != "self"
    }


def call_with(target: Callable, arguments: Mapping[str, Any], path: str) -> Any:
    """`target(**arguments)` after `check_arguments`."""
    check_arguments(target, arguments, path)
    return target(**arguments)


def pick(registry: Mapping[str, Any], name: str, path: str) -> Any:
    """registry[name], or a ConfigError listing the choices."""
    if name not in registry:
        raise ConfigError(f"{path}: unknown name {name!r}; choose one of {', '.join(sorted(registry))}")
    return registry[name]


def _name(target: Callable) -> str:
    return getattr(target, "__qualname__", repr(target))


# ----------------------------------------------------------------------------------------------------------------
# The run configuration
# ----------------------------------------------------------------------------------------------------------------


def load_run_config(cfg: DictConfig | Mapping[str, Any]) -> RunConfig:
    """Resolve interpolations and validate a composed config against `RunConfig` and its cross-key rules."""
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{getattr(error, 'full_key', '') or '<root>'}: {str(error).splitlines()[0]}") from None
    run = validate_section(RunConfig, resolved)
    errors = consistency_errors(run)
    if errors:
        raise ConfigError("; ".join(errors))
    return run


def consistency_errors(run: RunConfig) -> list[str]:
    """Keys that are valid alone but would do nothing given the rest of the config."""
    trainer = run.trainer
    errors = []
    if trainer.load_path is None:
        unused = [
            name for name, is_set in (
                ("load_weights_only", trainer.load_weights_only),
                ("load_strict_model_weights", not trainer.load_strict_model_weights),
                ("load_ignore_keys", trainer.load_ignore_keys is not None),
            ) if is_set
        ]
        errors += [f"trainer.{name} is set but trainer.load_path is not: there is nothing to load" for name in unused]
    if not trainer.load_strict_model_weights and not trainer.load_weights_only:
        errors.append(
            "trainer.load_strict_model_weights: only weights-only loads (trainer.load_weights_only) are strict; "
            "a full-state load is never strict in Composer, so false has no effect"
        )
    if run.algorithms.low_precision_layernorm and trainer.precision not in ("amp_bf16", "amp_fp16"):
        errors.append(
            f"algorithms.low_precision_layernorm needs trainer.precision amp_bf16 or amp_fp16, "
            f"not {trainer.precision} (it would have no effect)"
        )
    if trainer.fsdp_config is not None and not isinstance(trainer.fsdp_config, dict):
        errors.append(f"trainer.fsdp_config: a mapping of Composer FSDP options or null, not {trainer.fsdp_config!r}")
    elif trainer.fsdp_config is not None:
        if trainer.device != "gpu":
            errors.append(f"trainer.fsdp_config needs trainer.device gpu, not {trainer.device}")
        from composer.utils.parallelism import FSDPConfig

        # Composer's FSDPConfig sets any attribute it is given, known or not.
        known = {option.name for option in fields(FSDPConfig) if not option.name.startswith("_")}
        errors += [
            f"trainer.fsdp_config.{key}: not a Composer FSDP option (options: {', '.join(sorted(known))})"
            for key in sorted(set(trainer.fsdp_config) - known)
        ]
    return errors
