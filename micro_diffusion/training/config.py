"""The training configuration: schemas of every section, and the check that every key set is used.

A composed Hydra config is validated before anything is built:

- the sections `train.py` consumes itself (optimizer, algorithms, trainer, ...) against the dataclass schemas
  below: a key that is not a schema field raises, a value of the wrong type raises, and so does a value outside
  the range its field declares (`Annotated[int, POSITIVE]`, `DURATION` for Composer time strings);
- sections whose keys are the arguments of one function or class (`model` for the task's model factory,
  `scheduler`, each entry of `callbacks` and `logger`) against that callable's signature;
- the task's own sections (`model`, `data`) by the task builder, with the same two helpers.

Keys that only make sense together are checked together (`consistency_errors`): e.g. `load_ignore_keys`
without a `load_path`, or low-precision LayerNorm without mixed precision (train.py adds the checks that need
the built task, such as an evaluation interval without evaluation data). Every error names the dotted path
of the key. The original code printed "not supported" for an `ema` block and carried on; here a key that
would do nothing stops the run before it starts.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from micro_diffusion import compat
from micro_diffusion.config_checks import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    ConfigError,
    Constraint,
    Range,
    check_arguments,
    constraint_errors,
)

Schema = TypeVar("Schema")


class PositiveTime(Constraint):
    """A Composer time string of a positive amount: "1000ba", "5ep", "640000sp", "0.5dur" (None: unset)."""

    def problem(self, value: Any) -> str | None:
        from composer.core import Time  # imported here: composing and validating a config needs no Composer

        if value is None:
            return None
        try:
            time = Time.from_timestring(str(value))
        except (TypeError, ValueError):
            return f"not a Composer time string (a number and a unit: 1000ba, 5ep, 640000sp), got {value!r}"
        return None if time.value > 0 else f"must be a positive time, got {value!r}"


DURATION = PositiveTime()
SEED = Range(0, 2**32 - 1)  # what Composer's seed_all accepts


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

    lr: Annotated[float, NON_NEGATIVE] = MISSING
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0
    betas: Annotated[list[float], FRACTION] = field(default_factory=lambda: [0.9, 0.999])
    eps: Annotated[float, POSITIVE] = 1e-8
    moe_lr_scale: Annotated[float, NON_NEGATIVE] = 1.0
    decay_all: bool = False


@dataclass
class GradientClippingConfig:
    """Composer's GradientClipping: clipping_type "norm", "value" or "adaptive"."""

    clipping_type: str = "norm"
    clipping_threshold: Annotated[float, POSITIVE] = MISSING


@dataclass
class AlgorithmsConfig:
    """gradient_clipping: null for none. low_precision_layernorm: run the trainable LayerNorms in the autocast
    dtype (needs trainer.precision amp_bf16 or amp_fp16)."""

    gradient_clipping: GradientClippingConfig | None = None
    low_precision_layernorm: bool = False


@dataclass
class TrainerConfig:
    """Arguments of the Composer Trainer, passed to it by name (`trainer_arguments`): a new Trainer option is one
    more field here. The fields in TRAINER_CONVERSIONS are converted to Trainer arguments instead, and the
    evaluation options (EVALUATION_OPTIONS) are passed only when the task has evaluation data.

    eval_interval: null when the task has no evaluation data; evaluation runs at this interval otherwise,
        with or without `compile`.
    compile: torch.compile the model. Region by region where the model marks compile regions (the MicroDiT: each
        transformer block and the caption refiner, `models.regional_compile`; train.py then passes
        `compile_config=None`), else the whole training forward (Composer `compile_config={}`).
    fsdp_config: Composer FSDP options (e.g. sharding_strategy SHARD_GRAD_OP, activation_checkpointing);
        null for DDP. (Typed Any: OmegaConf cannot merge a mapping into an Optional[Dict] that is null.)
    console_log_interval: print metrics to the console at this interval; null for the progress bar only.
    """

    device: str = "gpu"
    precision: str = "amp_bf16"
    max_duration: Annotated[str, DURATION] = MISSING
    device_train_microbatch_size: Annotated[Any, POSITIVE] = None
    eval_interval: Annotated[str | None, DURATION] = None
    eval_subset_num_batches: Annotated[int, Range(low=-1)] = -1
    save_folder: str = MISSING
    save_interval: Annotated[str, DURATION] = "1ep"
    save_num_checkpoints_to_keep: Annotated[int, Range(low=-1)] = -1
    save_overwrite: bool = False
    autoresume: bool = False
    load_path: str | None = None
    load_weights_only: bool = False
    load_strict_model_weights: bool = True
    load_ignore_keys: list[str] | None = None
    compile: bool = False
    fsdp_config: Any = None
    progress_bar: bool = True
    console_log_interval: Annotated[str | None, DURATION] = None


def _compile_config(compile: bool) -> dict[str, Any]:
    return {"compile_config": {} if compile else None}


def _parallelism_config(fsdp_config: dict[str, Any] | None) -> dict[str, Any]:
    return {"parallelism_config": None if fsdp_config is None else {"fsdp": fsdp_config}}


def _console_logging(console_log_interval: str | None) -> dict[str, Any]:
    return {"log_to_console": console_log_interval is not None, "console_log_interval": console_log_interval or "1ba"}


# TrainerConfig fields that are not Trainer arguments as they stand -> the Trainer arguments they become.
TRAINER_CONVERSIONS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "compile": _compile_config,
    "fsdp_config": _parallelism_config,
    "console_log_interval": _console_logging,
}
EVALUATION_OPTIONS = ("eval_interval", "eval_subset_num_batches")


def trainer_arguments(settings: TrainerConfig, has_eval: bool) -> dict[str, Any]:
    """The Composer Trainer's keyword arguments for `settings` (model, data, optimiser and the like excluded)."""
    arguments: dict[str, Any] = {}
    for option in fields(TrainerConfig):
        value = getattr(settings, option.name)
        if option.name in EVALUATION_OPTIONS and not has_eval:
            continue
        if option.name in TRAINER_CONVERSIONS:
            arguments.update(TRAINER_CONVERSIONS[option.name](value))
        else:
            arguments[option.name] = value
    return arguments


@dataclass
class RunConfig:
    """A training run. `task` selects the builder of model and data (`micro_diffusion.training.tasks.TASKS`).

    model, data: the task's sections, validated by the task builder.
    scheduler: `name` (a key of `optim.SCHEDULERS`) and that scheduler's arguments.
    callbacks, logger: name -> arguments of that callback / logger (null disables an entry).
    """

    exp_name: str = MISSING
    seed: Annotated[int, SEED] = MISSING
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


# `${cpu_has_amx:}` in a config: whether this CPU has AMX tiles, resolved where the config is read (e.g.
# configs/demo_autoencoder.yaml's `model.cpu_bf16`: bf16 autocast is faster only with native bf16).
OmegaConf.register_new_resolver("cpu_has_amx", lambda: compat.cpu_has_amx())  # looked up when resolved


# ----------------------------------------------------------------------------------------------------------------
# Validation helpers (also for task builders)
# ----------------------------------------------------------------------------------------------------------------


def validate_section(schema: type[Schema], values: Mapping[str, Any] | DictConfig, path: str = "") -> Schema:
    """`values` checked against the dataclass `schema` (no unknown keys, types converted, nothing missing, values
    within the ranges their fields declare)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        section = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = ".".join(part for part in (path, str(getattr(error, "full_key", "") or "")) if part)
        reason = str(error).splitlines()[0]
        raise ConfigError(f"{key or '<root>'}: {reason}") from None
    errors = constraint_errors(schema, {option.name: getattr(section, option.name) for option in fields(schema)}, path)
    if errors:
        raise ConfigError("; ".join(errors))
    return section


def call_with(target: Callable, arguments: Mapping[str, Any], path: str) -> Any:
    """`target(**arguments)` after `check_arguments`."""
    check_arguments(target, arguments, path)
    return target(**arguments)


def pick(registry: Mapping[str, Any], name: str, path: str) -> Any:
    """registry[name], or a ConfigError listing the choices."""
    if name not in registry:
        raise ConfigError(f"{path}: unknown name {name!r}; choose one of {', '.join(sorted(registry))}")
    return registry[name]


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
    if trainer.fsdp_config is not None and run.callbacks.get("power_ema") is not None:
        errors.append(
            "callbacks.power_ema does not run under FSDP (trainer.fsdp_config is set): it averages the parameters "
            "each rank holds, and FSDP leaves each rank a shard of them; train with DDP (trainer.fsdp_config: null) "
            "or without power_ema"
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
