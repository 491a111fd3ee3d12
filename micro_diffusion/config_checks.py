"""Checks of configuration keys against the arguments of the function or class they configure.

Shared by the training configuration (`micro_diffusion.training.config`: the `model` section, schedulers,
callbacks, loggers) and by the commands that rebuild a model from a config file (`micro_diffusion.models.sampling`),
so that a key that would do nothing raises the same error, naming its dotted path, wherever it is read.

Ranges are declared once, in the annotation of the argument or schema field they bound, and checked wherever that
callable or schema is checked: `train_batch_size: Annotated[int, POSITIVE]`, `lr: Annotated[float, NON_NEGATIVE]`.
A value out of range then fails when the config is read, not minutes later inside torch.
"""

from __future__ import annotations

import inspect
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Any


class ConfigError(ValueError):
    """A configuration key that is unknown, of the wrong type, missing, or set without effect."""


def check_arguments(target: Callable, arguments: Mapping[str, Any], path: str) -> None:
    """Raise a ConfigError naming `path.<key>` for a key that is not an argument of `target`, for a required
    argument that is missing, or for a value that breaks a `Constraint` of its annotation. A target that takes
    **kwargs cannot be checked and is refused."""
    parameters = _keyword_parameters(target, path)
    unknown = sorted(set(arguments) - set(parameters))
    if unknown:
        raise ConfigError(
            f"{path}.{unknown[0]}: unknown key; {_name(target)} takes {', '.join(sorted(parameters)) or 'nothing'}"
        )
    missing = [name for name, p in parameters.items() if p.default is p.empty and name not in arguments]
    if missing:
        raise ConfigError(f"{path}.{missing[0]}: required by {_name(target)} but not set")
    errors = constraint_errors(target, arguments, path)
    if errors:
        raise ConfigError("; ".join(errors))


def _keyword_parameters(target: Callable, path: str) -> dict[str, inspect.Parameter]:
    """The arguments `target` can take by keyword. Classes that inherit Composer's `Callback.__init__` (a stub
    that swallows any argument) take none."""
    from composer.core import Callback  # imported here: composing and validating a config needs no Composer

    if inspect.isclass(target) and target.__init__ in (object.__init__, Callback.__init__):
        return {}
    signature = inspect.signature(target)
    if any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
        raise ConfigError(
            f"{path}: {_name(target)} takes **kwargs, so its configuration keys cannot be checked; name a subclass "
            "with explicit arguments in `_target_`"
        )
    return {
        name: p for name, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name != "self"
    }


def _name(target: Callable) -> str:
    return getattr(target, "__qualname__", repr(target))


# ----------------------------------------------------------------------------------------------------------------
# Ranges
# ----------------------------------------------------------------------------------------------------------------


class Constraint(ABC):
    """A rule on a key's value, declared as metadata of its annotation (`Annotated[int, POSITIVE]`, outermost:
    `Annotated[int | None, POSITIVE]`, not `Annotated[int, POSITIVE] | None`)."""

    @abstractmethod
    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` (e.g. "must be > 0, got 0"), or None when it is allowed."""


@dataclass(frozen=True)
class Range(Constraint):
    """A number within bounds: [low, high], either side open or absent. Values that are not numbers (None for an
    unset optional key, "auto") are left to the type checks."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def problem(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        above_low = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below_high = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return None if above_low and below_high else f"must be {self}, got {value!r}"  # NaN is neither

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"{'<' if self.high_open else '<='} {self.high}"


POSITIVE = Range(low=0, low_open=True)  # sizes, counts of things that must exist, scales
NON_NEGATIVE = Range(low=0)  # worker counts, learning rates, weight decay
PROBABILITY = Range(0, 1)  # e.g. a caption drop probability
FRACTION = Range(0, 1, high_open=True)  # a share that cannot be all: a mask ratio, Adam's betas


def constraint_errors(target: Callable | type, values: Mapping[str, Any], path: str = "") -> list[str]:
    """One message naming `path.<key>` per value that breaks a `Constraint` in the annotations of `target` (a
    function, a class's __init__, or a dataclass's fields). A list is checked item by item (`<key>.<index>`); a
    dataclass value (a nested schema section), field by field against its own class."""
    declared = _declared_constraints(target)
    errors = []
    for name, value in values.items():
        key = f"{path}.{name}" if path else name
        if is_dataclass(value) and not isinstance(value, type):
            errors += constraint_errors(type(value), {f.name: getattr(value, f.name) for f in fields(value)}, key)
        for constraint in declared.get(name, ()):
            errors += _value_errors(constraint, value, key)
    return errors


def _value_errors(constraint: Constraint, value: Any, key: str) -> list[str]:
    if isinstance(value, list | tuple):
        return [error for i, item in enumerate(value) for error in _value_errors(constraint, item, f"{key}.{i}")]
    problem = constraint.problem(value)
    return [] if problem is None else [f"{key}: {problem}"]


def _declared_constraints(target: Callable | type) -> dict[str, list[Constraint]]:
    """Argument / field name -> the constraints its annotation declares."""
    annotated = target.__init__ if inspect.isclass(target) and not is_dataclass(target) else target
    try:
        hints = typing.get_type_hints(annotated, include_extras=True)
    except NameError:  # another package's annotation that does not resolve: it declares none of our constraints
        return {}
    return {
        name: [item for item in getattr(hint, "__metadata__", ()) if isinstance(item, Constraint)]
        for name, hint in hints.items()
    }
