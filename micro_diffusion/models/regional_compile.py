"""Regional compilation: `torch.compile` each repeated unit of a network (a transformer block) on its own, rather
than the whole network as one graph.

Compiling the whole MicroDiT_XL_2 training forward as one graph took about 4 minutes per mask ratio on an H100
(benchmarks/RESULTS.md, issue 6): every block is traced, differentiated and lowered again, and a new mask ratio
recompiles everything. Compiled region by region:
- blocks with the same parameter shapes share one compiled graph: Dynamo caches compiled code per code object
  (`DiTBlock.forward`) and guards on the module's type, attribute values and tensor shapes, not on its identity;
- a new mask ratio recompiles only the regions whose token count changed (the backbone blocks), not the
  patch-mixer or the caption refiner; a route ratio (token routing) only the blocks of the route span;
- the glue between regions (embeddings, masking, the loss) stays eager: it is element-wise work on small tensors
  and keeps the random token mask outside any graph.
Dynamo always treats parameter shapes as static, so every distinct block shape is its own graph: MicroDiT's
layer-wise scaling gives most backbone blocks a shape of their own (`distinct_regions` counts them).

Regions are compiled in place with `nn.Module.compile`: state-dict keys do not change (no `_orig_mod.`), and FSDP
or activation-checkpointing wrappers applied afterwards wrap the compiled module, so each region compiles inside
its FSDP unit and is recomputed, compiled, in the backward pass. A deep copy (an EMA copy) is not compiled.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

REGION_FLAG = "_compile_region"
# Compiled variants one region shape may need: token counts (masked training, routed training in the route span,
# unmasked evaluation) x grad mode x a static and a dynamic batch dimension (Dynamo recompiles once with a dynamic
# batch when the batch changes).
VARIANTS_PER_SHAPE = 12


def mark_compile_regions(modules: Iterable[nn.Module]) -> None:
    """Flag modules as units of regional compilation (see `compile_regions`)."""
    for module in modules:
        setattr(module, REGION_FLAG, True)


def compile_regions_of(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` flagged by `mark_compile_regions`, outermost first (a region inside a region is not
    listed: it is compiled as part of its parent)."""
    regions: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if getattr(module, REGION_FLAG, False):
            regions.append(module)
            inside.update(id(sub) for sub in module.modules())
    return regions


def region_shape(module: nn.Module) -> tuple:
    """What makes two regions share a compiled graph: module type and the names and shapes of parameters and
    buffers (values of plain attributes such as `mp` are the same across one network's blocks)."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return (type(module).__qualname__, *((name, tuple(tensor.shape)) for name, tensor in tensors))


def distinct_regions(model: nn.Module) -> int:
    """Number of distinct region shapes of `model`: the graphs regional compilation builds per token count."""
    return len({region_shape(module) for module in compile_regions_of(model)})


def compile_regions(model: nn.Module, **compile_options) -> list[nn.Module]:
    """Compile every region of `model` in place (`nn.Module.compile(**compile_options)`); returns the regions,
    an empty list when `model` marks none (the caller may then compile it whole).

    Regions share their code object, so Dynamo's per-code-object recompile limit (8 by default, after which it
    would silently run the rest eagerly) is raised to `VARIANTS_PER_SHAPE` times the number of distinct shapes.
    """
    regions = compile_regions_of(model)
    if not regions:
        return regions
    needed = VARIANTS_PER_SHAPE * distinct_regions(model)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, needed)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, needed)
    for module in regions:
        module.compile(**compile_options)
    return regions
