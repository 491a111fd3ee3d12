"""Optimiser parameter groups and learning-rate schedules.

Parameter groups: weight decay applies to weight matrices only; norm scales, biases and embedding tables are
not decayed, nor are magnitude-preserving weights (EDM2's MPConv and MP experts), whose forced weight
normalisation resets their norm at every training forward, so decay would only fight it. Parameters of
expert-choice MoE layers (their expert weights `w1`, `w2` and router `gate`) are found by module type, not by
name, and get `lr * moe_lr_scale`. (The original intended half the learning rate for MoE parameters but
filtered on a name, "moe", that no parameter has, so the scale never applied.)
Buffers such as the fixed position embedding and the mask token are not parameters and never reach the
optimiser.

Schedules are Composer schedulers (multipliers of each group's base learning rate), so a group's relative
scale holds at every step: cosine, constant and linear with warm-up from Composer, plus EDM2's inverse square
root decay, which Composer lacks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from composer.core import State, Time, TimeUnit
from composer.optim import (
    ComposerScheduler,
    ConstantScheduler,
    ConstantWithWarmupScheduler,
    CosineAnnealingWithWarmupScheduler,
    LinearWithWarmupScheduler,
)
from torch import nn

from micro_diffusion.models.layers import ExpertChoiceMoE
from micro_diffusion.models.mp_layers import MPConv

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)
NO_DECAY_TYPES: tuple[type[nn.Module], ...] = (*NORM_TYPES, nn.Embedding, MPConv)


def _trainable_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, nn.Module]]:
    """(qualified name, parameter, owning module) of every parameter that requires grad, each once."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                yield (f"{module_name}.{param_name}" if module_name else param_name), param, module


def _expert_parameter_ids(model: nn.Module) -> set[int]:
    return {id(p) for module in model.modules() if isinstance(module, ExpertChoiceMoE) for p in module.parameters()}


def is_decayed(name: str, module: nn.Module) -> bool:
    """Weight decay applies to everything but norms, embedding tables, biases and magnitude-preserving weights."""
    magnitude_preserving = isinstance(module, ExpertChoiceMoE) and module.mp  # its own parameters: the experts
    return not isinstance(module, NO_DECAY_TYPES) and not magnitude_preserving and name.rsplit(".", 1)[-1] != "bias"


def parameter_groups(
    model: nn.Module, lr: float, weight_decay: float, moe_lr_scale: float = 1.0, decay_all: bool = False
) -> list[dict]:
    """Optimiser groups of the trainable parameters of `model`, named `decay`, `no_decay`, `moe_decay`, ...

    Args:
        lr: base learning rate; MoE layers' parameters get `lr * moe_lr_scale`.
        weight_decay: decay of the decayed groups (the others get 0).
        decay_all: decay every parameter (the original recipe's behaviour).
    Empty groups are left out. Each group has a `name` key, kept in checkpoints.
    """
    expert_ids = _expert_parameter_ids(model)
    groups: dict[str, dict] = {}
    for name, param, module in _trainable_parameters(model):
        decayed = decay_all or is_decayed(name, module)
        moe = id(param) in expert_ids
        key = ("moe_" if moe else "") + ("decay" if decayed else "no_decay")
        group = groups.setdefault(key, {
            "name": key,
            "params": [],
            "lr": lr * (moe_lr_scale if moe else 1.0),
            "weight_decay": weight_decay if decayed else 0.0,
        })
        group["params"].append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if moe_lr_scale != 1.0 and not expert_ids:
        raise ValueError(f"moe_lr_scale is {moe_lr_scale} but the model has no expert-choice MoE layer")
    return list(groups.values())


def build_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: Sequence[float],
    eps: float,
    moe_lr_scale: float = 1.0,
    decay_all: bool = False,
) -> torch.optim.AdamW:
    """Fused AdamW over `parameter_groups(model, ...)`."""
    groups = parameter_groups(model, lr, weight_decay, moe_lr_scale, decay_all)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)


class InverseSqrtScheduler(ComposerScheduler):
    """EDM2's schedule: multiplier 1 / sqrt(max(t / t_ref, 1)), times a linear warm-up min(t / t_warmup, 1).

    Args:
        t_ref: time at which the decay starts, e.g. "70000ba" or "143360000sp" (EDM2 counts images).
        t_warmup: length of the linear warm-up ("0ba" for none), in any unit of the timestamp.
    """

    def __init__(self, t_ref: str | Time, t_warmup: str | Time = "0ba") -> None:
        self.t_ref = _absolute_time(t_ref, "t_ref")
        self.t_warmup = _absolute_time(t_warmup, "t_warmup")
        if self.t_ref.value <= 0:
            raise ValueError(f"t_ref must be positive, got {t_ref}")

    def __call__(self, state: State, ssr: float = 1.0) -> float:
        elapsed = state.timestamp.get(self.t_ref.unit).value
        multiplier = 1.0 / math.sqrt(max(elapsed / (self.t_ref.value * ssr), 1.0))
        if self.t_warmup.value > 0:
            warmed = state.timestamp.get(self.t_warmup.unit).value
            multiplier *= min(warmed / (self.t_warmup.value * ssr), 1.0)
        return multiplier


def _absolute_time(value: str | Time, name: str) -> Time:
    time = Time.from_input(value, TimeUnit.BATCH)
    if time.unit in (TimeUnit.DURATION, TimeUnit.SECOND):
        raise ValueError(f"{name} must be in ba, sp, ep, tok or iter; got {value}")
    return time


SCHEDULERS: dict[str, type[ComposerScheduler]] = {
    "constant": ConstantScheduler,
    "constant_with_warmup": ConstantWithWarmupScheduler,
    "cosine_with_warmup": CosineAnnealingWithWarmupScheduler,
    "linear_with_warmup": LinearWithWarmupScheduler,
    "inverse_sqrt": InverseSqrtScheduler,
}
