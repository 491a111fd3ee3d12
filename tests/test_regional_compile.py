"""Regional compilation of the MicroDiT (issue 17): no graph breaks in the forward, regions reuse compiled graphs,
and the compiled training step (with FSDP units and activation checkpointing) computes the eager loss and
gradients."""

from __future__ import annotations

import socket

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
from torch._dynamo.utils import counters
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.fsdp import FullyShardedDataParallel

from micro_diffusion.models.dit import DiT, create_dit, num_kept_tokens
from micro_diffusion.models.regional_compile import (
    VARIANTS_PER_SHAPE,
    compile_regions,
    compile_regions_of,
    distinct_regions,
    region_shape,
)


def tiny_dit(**kwargs) -> DiT:
    """MicroDiT_XXS_2 (MoE in every other block) with random, not adaLN-Zero, weights: every branch is live.
    kwargs go to the DiT constructor."""
    torch.manual_seed(0)
    model = create_dit("MicroDiT_XXS_2", input_size=8, caption_channels=16, **kwargs)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (2, 4, 8, 8), c_noise (2,), caption (2, 1, 6, 16), caption mask (2, 6) with padding in the first row."""
    generator = torch.Generator().manual_seed(1)
    caption_mask = torch.ones(2, 6, dtype=torch.bool)
    caption_mask[0, 4:] = False
    return (torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, generator=generator),
            torch.randn(2, 1, 6, 16, generator=generator), caption_mask)


def training_step(model: torch.nn.Module, mask_ratio: float, route_ratio: float = 0.0) -> torch.Tensor:
    """Forward and backward of a loss on the output; the token mask (and route) is drawn from a fixed seed."""
    x, t, y, caption_mask = batch()
    torch.manual_seed(2)
    loss = model(x, t, y, mask_ratio=mask_ratio, caption_mask=caption_mask, route_ratio=route_ratio)
    loss = loss["sample"].square().mean()
    loss.backward()
    return loss.detach()


def shapes_and_token_counts(model: DiT, mask_ratio: float) -> int:
    """Distinct (region shape, tokens) pairs of a forward: the graphs regional compilation should build."""
    kept = num_kept_tokens(model.num_tokens, mask_ratio)
    seen = {(region_shape(model.y_emb_preprocess), "caption")}
    seen |= {(region_shape(block), model.num_tokens) for block in model.patch_mixer}
    seen |= {(region_shape(block), kept) for block in model.blocks}
    return len(seen)


def assert_same_gradients(reference: torch.nn.Module, model: torch.nn.Module, rtol: float, atol: float) -> None:
    grads = {name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", ""): p.grad
             for name, p in model.named_parameters()}
    for name, param in reference.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(grads[name], param.grad, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def assert_one_graph(model: torch.nn.Module, *args, **kwargs) -> None:
    """Dynamo traces model(*args, **kwargs) as one graph, without a break (a break names itself)."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(*args, **kwargs)
    reasons = [f"{reason.reason} at {reason.user_stack[-1] if reason.user_stack else '?'}"
               for reason in explained.break_reasons]
    assert explained.graph_break_count == 0, "graph breaks:\n" + "\n".join(reasons)
    assert explained.graph_count == 1


@pytest.mark.parametrize("mask_ratio", [0.0, 0.75])
@pytest.mark.parametrize("with_caption_mask", [False, True])
def test_dit_forward_has_no_graph_breaks(mask_ratio, with_caption_mask):
    """The whole forward (embeddings, mixer, masking, MoE backbone, restore) is one graph."""
    x, t, y, caption_mask = batch()
    assert_one_graph(tiny_dit(), x, t, y, mask_ratio=mask_ratio,
                     caption_mask=caption_mask if with_caption_mask else None)


@pytest.mark.slow
def test_full_graph_forward_and_backward_compile_masked():
    """fullgraph=True through AOTAutograd: forward and backward of the masked MoE network trace without a break."""
    model = tiny_dit()
    reference = tiny_dit()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = training_step(compiled, 0.75)
    torch.testing.assert_close(loss, training_step(reference, 0.75))
    assert_same_gradients(reference, model, rtol=1e-5, atol=1e-7)


def test_regions_are_the_blocks_and_the_caption_refiner():
    with torch.device("meta"):
        model = create_dit("MicroDiT_XL_2")
    regions = compile_regions_of(model)
    assert regions == [model.y_emb_preprocess, *model.patch_mixer, *model.blocks]
    # Layer-wise scaling: 24 of the 28 backbone blocks have a shape of their own; the 6 mixer blocks have 2.
    assert distinct_regions(model) == 1 + 2 + 24


def test_compile_regions_keeps_state_dict_keys_and_raises_the_recompile_limit():
    model = tiny_dit()
    keys = list(model.state_dict())
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=8):
        compile_regions(model, backend="eager")
        assert list(model.state_dict()) == keys
        needed = VARIANTS_PER_SHAPE * distinct_regions(model)
        assert torch._dynamo.config.recompile_limit == torch._dynamo.config.accumulated_recompile_limit == needed


@pytest.mark.slow
def test_regions_reuse_compiled_graphs_and_match_eager_under_fsdp_and_checkpointing(monkeypatch):
    """Each block is its own FSDP unit, checkpointed and compiled inside the unit (train.py's arrangement on one
    rank): the loss and every gradient equal the eager network's, and identical blocks share one graph."""
    reference = tiny_dit()
    reference_loss = training_step(reference, 0.5)
    model = tiny_dit()
    torch._dynamo.reset()
    counters.clear()
    regions = compile_regions(model, backend="aot_eager")
    apply_activation_checkpointing(
        model, check_fn=lambda module: any(module is region for region in regions),
        checkpoint_wrapper_fn=lambda module: checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
    )
    region_ids = {id(region) for region in regions}
    with socket.socket() as probe:  # a port of its own: earlier tests in the process may have set or held one
        probe.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(probe.getsockname()[1]))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    if dist.is_initialized():  # left by an earlier test of the process; this test needs a group of its own
        dist.destroy_process_group()
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        wrapped = FullyShardedDataParallel(
            model, device_id=torch.device("cpu"), use_orig_params=True,
            auto_wrap_policy=lambda module, recurse, nonwrapped_numel: recurse or id(module) in region_ids,
        )
        assert sum(isinstance(m, FullyShardedDataParallel) for m in wrapped.modules()) == len(regions) + 1
        torch.testing.assert_close(training_step(wrapped, 0.5), reference_loss)
        assert_same_gradients(reference, wrapped, rtol=1e-4, atol=1e-6)
    finally:
        dist.destroy_process_group()
    # Under FSDP, Dynamo lets parameter shapes go dynamic on a recompile, so blocks may share even more.
    assert counters["stats"]["unique_graphs"] <= shapes_and_token_counts(reference, 0.5)


@pytest.mark.slow
def test_blocks_of_one_shape_and_token_count_share_one_graph():
    model = tiny_dit()
    torch._dynamo.reset()
    counters.clear()
    compile_regions(model, backend="eager")
    training_step(model, 0.0)  # unmasked: the first mixer block and the last backbone block have one shape
    assert counters["stats"]["unique_graphs"] == shapes_and_token_counts(model, 0.0) < len(compile_regions_of(model))


@pytest.mark.slow
@pytest.mark.timeout(1800)  # Inductor compiles every region's C++ kernels cold: over 900 s on a loaded 2-core machine
def test_inductor_regions_and_fused_adamw_step_match_eager():
    """The optimised step (regions compiled by Inductor, fused AdamW) gives the eager loss and gradients, masked,
    within float32 tolerance, and fused AdamW the eager update of the same gradients."""
    reference, model = tiny_dit(), tiny_dit()
    torch._dynamo.reset()
    compile_regions(model)
    for _ in range(2):  # the second step runs the cached graphs
        for network in (reference, model):
            network.zero_grad(set_to_none=True)
        loss = training_step(model, 0.75)
        torch.testing.assert_close(loss, training_step(reference, 0.75), rtol=1e-5, atol=1e-6)
        assert_same_gradients(reference, model, rtol=1e-3, atol=1e-4)  # inductor reorders float sums
    # Adam divides by the gradient's own scale, so an element whose gradient is near zero turns Inductor's 1e-5
    # reordering noise into an update of up to lr: the fused AdamW step is compared on the same gradients.
    for expected, actual in zip(reference.parameters(), model.parameters()):
        actual.grad = None if expected.grad is None else expected.grad.clone()
    optimizers = [torch.optim.AdamW(network.parameters(), lr=1e-3, fused=fused)
                  for network, fused in ((reference, False), (model, True))]
    for optimizer in optimizers:
        optimizer.step()
    for (name, expected), actual in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
