"""Token routing (TREAD): a random share of the backbone's tokens skips the blocks of `route_span` and rejoins
unchanged, in place; every token reaches the loss. Training only: inference, checkpoints and validation are those
of the network without routing."""

from __future__ import annotations

import pytest
import torch
from test_dit import CAPTION_LENGTH, inputs, randomize, tiny_dit
from test_regional_compile import assert_one_graph, assert_same_gradients, batch, training_step
from test_regional_compile import tiny_dit as live_tiny_dit
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from micro_diffusion.encoders.vae import load_vae
from micro_diffusion.models.dit import DiT, gather_tokens, num_kept_tokens
from micro_diffusion.models.layers import ExpertChoiceMoE
from micro_diffusion.models.model import LatentDiffusion, create_latent_diffusion

SPAN = (1, 3)  # of MicroDiT_XXS_2's 4 blocks; block 1 is an expert-choice MoE block
NUM_TOKENS = 64  # tiny_dit: 16 x 16 latents in 2 x 2 patches


def record_blocks(model: DiT) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], list]:
    """Forward hooks on every backbone block: ({i: tokens in (N, K_i, D)}, {i: tokens out}, hook handles)."""
    seen_in: dict[int, torch.Tensor] = {}
    seen_out: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def record(_module, args, output):
            seen_in[index], seen_out[index] = args[0].detach(), output.detach()

        return record

    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(model.blocks)]
    return seen_in, seen_out, handles


def routed_forward(model: DiT, **kwargs) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """One forward of `model` on `inputs()` with `kwargs`: what each backbone block took in and gave out."""
    seen_in, seen_out, handles = record_blocks(model)
    try:
        with torch.no_grad():
            model(*inputs(), **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return seen_in, seen_out


def positions_of(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Index (N, K) of each row of rows (N, K, D) among tokens (N, T, D), checked to be an exact copy."""
    indices = torch.cdist(rows, tokens).argmin(dim=-1)
    assert torch.equal(gather_tokens(tokens, indices), rows)
    return indices


@pytest.mark.parametrize("use_patch_mixer", [True, False])
def test_the_span_sees_a_random_subset_and_routed_tokens_come_back_unchanged_in_place(use_patch_mixer):
    model = randomize(tiny_dit(route_span=SPAN, use_patch_mixer=use_patch_mixer))
    seen_in, seen_out = routed_forward(model, route_ratio=0.75)
    start, end = SPAN
    span_input, after_span = seen_out[start - 1], seen_in[end]
    routed_count = num_kept_tokens(NUM_TOKENS, 0.75)
    assert span_input.shape[1] == after_span.shape[1] == NUM_TOKENS
    assert [seen_in[i].shape[1] for i in range(start, end)] == [routed_count] * (end - start)

    kept = positions_of(seen_in[start], span_input)  # the span's tokens are rows of its input ...
    assert all(len(row.unique()) == routed_count for row in kept)  # ... distinct ones ...
    assert not torch.equal(kept[0].sort().values, kept[1].sort().values)  # ... drawn per sample
    torch.testing.assert_close(gather_tokens(after_span, kept), seen_out[end - 1], rtol=0, atol=0)
    routed = torch.ones(after_span.shape[:2], dtype=torch.bool).scatter(1, kept, False)
    assert torch.equal(after_span[routed], span_input[routed])


def test_route_ratio_zero_and_inference_are_the_network_without_routing():
    plain, spanned = randomize(tiny_dit()), randomize(tiny_dit(route_span=SPAN))
    assert plain.state_dict().keys() == spanned.state_dict().keys()
    spanned.load_state_dict(plain.state_dict(), strict=True)
    x, t, y = inputs()
    with torch.no_grad():
        expected = plain(x, t, y)["sample"]
        torch.testing.assert_close(spanned(x, t, y)["sample"], expected, rtol=0, atol=0)
        torch.testing.assert_close(spanned(x, t, y, route_ratio=0.0)["sample"], expected, rtol=0, atol=0)
        torch.testing.assert_close(spanned(x, t, y, cfg=3.0)["sample"], plain(x, t, y, cfg=3.0)["sample"],
                                   rtol=0, atol=0)
        routed = spanned(x, t, y, route_ratio=0.5)
    assert routed["mask"] is None  # every token is predicted: none is masked out of the loss
    assert not torch.allclose(routed["sample"], expected)


def test_routing_among_masked_tokens_through_an_moe_block():
    model = randomize(tiny_dit(route_span=SPAN))
    assert isinstance(model.blocks[1].mlp, ExpertChoiceMoE)
    moe_inputs: list[int] = []
    handle = model.blocks[1].mlp.register_forward_hook(lambda _m, args, _o: moe_inputs.append(args[0].shape[1]))
    try:
        seen_in, _ = routed_forward(model, mask_ratio=0.5, route_ratio=0.5)
    finally:
        handle.remove()
    kept = num_kept_tokens(NUM_TOKENS, 0.5)
    assert [seen_in[i].shape[1] for i in range(4)] == [kept, kept // 2, kept // 2, kept]
    assert moe_inputs == [kept // 2]  # expert-choice capacity follows the tokens the block sees

    x, t, y = inputs()
    out = model(x, t, y, mask_ratio=0.5, route_ratio=0.5)
    assert out["mask"].sum(dim=1).tolist() == [NUM_TOKENS - kept] * 2
    out["sample"].square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.blocks.parameters())


def test_bad_route_spans_and_ratios_are_refused():
    for span in [(2, 2), (0, 5), (-1, 2), (1,)]:
        with pytest.raises(ValueError, match="route_span must be"):
            tiny_dit(route_span=span)
    x, t, y = inputs()
    with pytest.raises(ValueError, match="needs a DiT built with a route_span"):
        tiny_dit()(x, t, y, route_ratio=0.5)
    model = tiny_dit(route_span=SPAN)
    for ratio in (1.0, 1.5, -0.25):
        with pytest.raises(ValueError, match=r"route_ratio must be in \[0, 1\)"):
            model(x, t, y, route_ratio=ratio)
    with pytest.raises(ValueError, match="route_ratio 0.99 keeps no token out of 64"):
        model(x, t, y, route_ratio=0.99)
    with pytest.raises(ValueError, match="needs a DiT built with a route_span"):
        tiny_dit().training_flops(0.75, CAPTION_LENGTH, route_ratio=0.5)


@pytest.mark.parametrize(("mask_ratio", "route_ratio"), [(0.0, 0.5), (0.5, 0.5), (0.5, 0.0)])
def test_flop_counter_counts_span_blocks_at_the_routed_token_count(mask_ratio, route_ratio):
    model = tiny_dit(route_span=SPAN)
    x, t, y = inputs()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, y, mask_ratio=mask_ratio, route_ratio=route_ratio)
    measured_blocks = sum(sum(counts.values()) for name, counts in counter.get_flop_counts().items()
                          if name.startswith("DiT.blocks.") and name.count(".") == 2)
    breakdown = dict(model.flop_breakdown(mask_ratio, CAPTION_LENGTH, route_ratio))
    assert breakdown["backbone"] * x.shape[0] == measured_blocks
    assert model.forward_flops(mask_ratio, CAPTION_LENGTH, route_ratio) * x.shape[0] == counter.get_total_flops()
    if route_ratio:
        assert model.training_flops(mask_ratio, CAPTION_LENGTH, route_ratio) < model.training_flops(
            mask_ratio, CAPTION_LENGTH
        )


def test_routed_forward_has_no_graph_breaks():
    x, t, y, caption_mask = batch()
    assert_one_graph(live_tiny_dit(route_span=SPAN), x, t, y, mask_ratio=0.5, caption_mask=caption_mask,
                     route_ratio=0.5)


@pytest.mark.slow
def test_routed_forward_and_backward_compile_as_one_graph():
    """fullgraph=True through AOTAutograd: the routed, masked MoE network's forward and backward trace without a
    break and give the eager loss and gradients (the same route: the same seed)."""
    model, reference = live_tiny_dit(route_span=SPAN), live_tiny_dit(route_span=SPAN)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(training_step(compiled, 0.5, 0.5), training_step(reference, 0.5, 0.5))
    assert_same_gradients(reference, model, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# LatentDiffusion
# ----------------------------------------------------------------------------------------------------------------


def test_latent_diffusion_routes_in_training_only(tiny_vae_dir, tiny_hf_clip_dir):
    torch.manual_seed(0)
    model = create_latent_diffusion(
        vae_name=str(tiny_vae_dir), text_encoder_name=tiny_hf_clip_dir.name, dit_arch="MicroDiT_XXS_2",
        latent_res=8, dtype="float32", train_mask_ratio=0.5, train_route_ratio=0.5,
        dit_kwargs={"route_span": list(SPAN)},
    )
    g = torch.Generator().manual_seed(0)
    latents = {"image_latents": torch.randn(2, 4, 8, 8, generator=g),
               "caption_latents": torch.randn(2, 1, 77, model.dit.caption_channels, generator=g)}
    seen: list[int] = []
    handle = model.dit.blocks[SPAN[0]].register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[1]))
    try:
        model.train()
        loss = model.loss(model(latents), latents)
        model.eval()
        model.validation_loss(latents)
        model.generate(prompt="a red circle", num_inference_steps=1, seed=0, return_only_latents=True)
    finally:
        handle.remove()
    assert torch.isfinite(loss)
    assert seen[0] == 4  # 16 tokens, 8 kept by masking, 4 of them through the span
    assert seen[1:] and all(n == 16 for n in seen[1:])  # validation and generation neither mask nor route


def test_latent_diffusion_refuses_routing_without_a_span():
    with pytest.raises(ValueError, match=r"dit_kwargs\['route_span'\].*not set"):  # before any encoder loads
        create_latent_diffusion(vae_name="no-such-vae", text_encoder_name=None, num_classes=2,
                                dit_arch="MicroDiT_XXS_2", train_route_ratio=0.5)
    dit = DiT(in_channels=3, dim=64, depth=2, head_dim=32, patch_mixer_dim=64, caption_channels=8)
    with pytest.raises(ValueError, match="build the DiT with a route_span"):
        LatentDiffusion(dit, load_vae("identity"), None, train_route_ratio=0.5)
    with pytest.raises(ValueError, match=r"train_route_ratio must be in \[0, 1\), got 1.0"):
        LatentDiffusion(dit, load_vae("identity"), None, train_route_ratio=1.0)
