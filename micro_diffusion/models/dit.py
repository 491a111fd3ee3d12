"""MicroDiT: a sparse diffusion transformer with a patch-mixer, deferred patch masking and expert-choice MoE.

Forward pass (training and inference share it):
  latents (N, C, H, W) -> patch embed + fixed 2-D sin-cos positions -> (N, T, D)
  c_noise (N,) -> timestep embedding; captions (N, 1, L, C_txt) -> projection -> refiner block -> (N, L, D)
  c = timestep embedding + MLP(mean of refined caption tokens)                       (the adaLN condition)
  patch-mixer blocks on ALL tokens -> random per-sample masking (keep (1 - ratio) T tokens)
  -> mixer-to-backbone projection -> backbone blocks on the kept tokens only -> final layer
     (token routing, training only: a random share of those tokens skips the blocks of `route_span`)
  -> dropped positions filled with a zero mask token (output space) -> unpatchify -> (N, C, H, W)

The constructor takes the original `DiT` arguments with the same defaults, and the module tree keeps the
original's parameter names, so released MicroDiT checkpoints load with `strict=True`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from micro_diffusion.diffusion.samplers import guided_denoiser
from micro_diffusion.models.layers import (
    CaptionProjection,
    CaptionRefiner,
    DiTBlock,
    ExpertChoiceMoE,
    FinalLayer,
    NormedMlp,
    PatchEmbed,
    SwiGLU,
    TimestepEmbedder,
    layer_norm,
    sincos_2d,
    tokens_per_expert,
)
from micro_diffusion.models.regional_compile import mark_compile_regions

# --------------------------------------------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------------------------------------------


class TokenMask(NamedTuple):
    """A per-sample random token mask.

    keep_indices: (N, K) ids of the kept tokens (in shuffled order); restore_indices: (N, T) inverse permutation;
    mask: (N, T) float, 1 = dropped token, 0 = kept (the convention of the original and of the masked loss).
    """

    keep_indices: torch.Tensor
    restore_indices: torch.Tensor
    mask: torch.Tensor


def num_kept_tokens(num_tokens: int, mask_ratio: float) -> int:
    return int(num_tokens * (1 - mask_ratio))


def random_token_mask(
    batch_size: int,
    num_tokens: int,
    mask_ratio: float,
    device: torch.device,
    generator: torch.Generator | None = None,
    ratio_name: str = "mask_ratio",
) -> TokenMask:
    """Draw an independent random permutation per sample and keep its first int(T * (1 - ratio)) tokens.

    ratio_name: the argument a ValueError names when the ratio is outside [0, 1) or keeps no token.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"{ratio_name} must be in [0, 1), got {mask_ratio}")
    num_keep = num_kept_tokens(num_tokens, mask_ratio)
    if num_keep < 1:
        raise ValueError(f"{ratio_name} {mask_ratio} keeps no token out of {num_tokens}")
    noise = torch.rand(batch_size, num_tokens, device=device, generator=generator)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(batch_size, num_tokens, device=device)
    mask[:, :num_keep] = 0
    return TokenMask(shuffle[:, :num_keep], restore, mask.gather(1, restore))


def gather_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x: (N, T, D), indices: (N, K) -> (N, K, D)."""
    return x.gather(1, indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """x (N, T, D) with its rows at indices (N, K) (distinct per sample) replaced by values (N, K, D): a new tensor,
    of the wider of the two dtypes (autocast may give block outputs another dtype than their inputs)."""
    dtype = torch.promote_types(x.dtype, values.dtype)
    return x.to(dtype).scatter(1, indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]), values.to(dtype))


def restore_tokens(kept: torch.Tensor, restore_indices: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Put kept outputs back in place and fill dropped positions: kept (N, K, P), fill (1, 1, P) -> (N, T, P)."""
    n, k, p = kept.shape
    t = restore_indices.shape[1]
    padded = torch.cat([kept, fill.to(kept.dtype).expand(n, t - k, p)], dim=1)
    return gather_tokens(padded, restore_indices)


# --------------------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------------------


def per_block_ratios(multipliers: Sequence[float], depth: int) -> list[float]:
    """One ratio per block: a list of length `depth` is used as is; a shorter one is spread over equal splits."""
    multipliers = [float(m) for m in multipliers]
    if len(multipliers) == depth:
        return multipliers
    if depth % len(multipliers):
        raise ValueError(f"depth {depth} is not divisible by the {len(multipliers)} given multipliers")
    return [m for m in multipliers for _ in range(depth // len(multipliers))]


def backbone_moe_blocks(depth: int, every_n: int) -> list[bool]:
    """Backbone block i is MoE when (i + 1) % every_n == 0, except the last block (always dense)."""
    return [(i + 1) % every_n == 0 and i < depth - 1 for i in range(depth)]


def mixer_moe_blocks(depth: int, every_n: int) -> list[bool]:
    """Mixer block i is MoE when i >= 1 and (i + 1) % every_n == 0; the last mixer block may be MoE."""
    return [i >= 1 and (i + 1) % every_n == 0 for i in range(depth)]


class DiT(nn.Module):
    """MicroDiT. Arguments, defaults and parameter names follow the original `DiT` class.

    Args:
        input_size: latent side (square latents), e.g. 32 at 256 px and 64 at 512 px with an 8x VAE.
        patch_size, in_channels: patchification of the latent.
        dim, depth, head_dim: backbone width, number of blocks and attention head width.
        multiple_of: FFN hidden widths are rounded up to this.
        caption_channels: width of the text-encoder states.
        pos_interp_scale: position coordinates are divided by this (2.0 for the 512-px stages).
        norm_eps: LayerNorm epsilon.
        depth_init: backbone output projections init with std 0.02 / sqrt(2 (i + 1)) (else 0.02 / sqrt(2 depth)).
        qkv_multipliers, ffn_multipliers: layer-wise scaling of attention and FFN widths (per block, or per split).
        use_patch_mixer, patch_mixer_depth, patch_mixer_dim, patch_mixer_qkv_ratio, patch_mixer_mlp_ratio: the
            patch-mixer that runs on all tokens before masking.
        use_bias: biases in attention, FFN and mixer projections (must be False with `mp`).
        num_experts, expert_capacity, experts_every_n: expert-choice MoE FFN placement and capacity.
        mp: magnitude-preserving transformer blocks (below). False builds the original network.
        route_span: (start, end), 0 <= start < end <= depth: the backbone blocks blocks[start:end] that token
            routing (TREAD, arXiv 2501.04765) lets a share of the tokens skip; None (the default) for no routing.
            It adds no parameter (the state dict is unchanged) and does nothing until a forward pass is given a
            `route_ratio` > 0, which training does (`LatentDiffusion.train_route_ratio`) and inference does not.

    Token routing (`route_ratio` r in the forward pass). Of the K tokens entering block `start` (all T, or the
    kept ones when patch masking is on), an independent random int(K (1 - r)) per sample go through
    blocks[start:end]; the others skip them and rejoin, unchanged and in their places, before block `end`. Unlike
    masking, every token still reaches the final layer and the loss; the span's blocks pay for fewer tokens.

    Magnitude-preserving option (`mp=True`, EDM2's MP layers where they are well defined in a DiT). In every
    transformer block (caption refiner, patch-mixer, backbone):
      - each plain learned linear layer, i.e. the self-attention qkv and output projections, the cross-attention
        q, kv and output projections, the SwiGLU w1, w2, w3 and the MoE experts' w1, w2, is an MP linear layer
        (`mp_layers.MPConv` with kernel (), or its batched form for the experts): weight fan-in vectors normalised
        to unit norm in the forward pass, forced to unit RMS in place in a training forward with grad enabled (EMA
        and eval copies never are), N(0, 1) init, no bias. Parameter names and shapes are unchanged; the state
        dict is that of a bias-free standard model plus a scalar `magnitude_preserving` buffer, so MP and
        standard weights never load into each other silently (strict loading names the key);
      - SiLU becomes mp_silu and the experts' GELU mp_gelu (both scaled to unit RMS over N(0, 1));
      - each residual join x + branch becomes mp_sum(x, branch, 0.3), and the adaLN gates multiply the branch by
        (1 + gate) instead of gate, so the zero-initialised gate passes a unit-variance branch (a zero branch
        would shrink the main path by 0.92 at every MP sum; it is EDM2's (1 + g emb) form).
    What stays standard, and why:
      - the adaLN modulation linears (in the blocks and the final layer): they map the condition to shift, scale
        and gate coefficients, not to activations, and must output exactly zero at init (adaLN-Zero), which a
        normalised weight cannot; their biases are the per-channel constant modulation;
      - LayerNorms and the QK-norm: they are what gives each branch its unit-variance input;
      - the MoE router and its probability-weighted gather/scatter-add combine: router outputs are logits
        (normalising them would pin the softmax temperature), and a token's number of experts (0 .. E) and its
        weights vary with the data, so there is no fixed rescale to unit variance. An MoE branch therefore
        starts well below unit RMS (about sqrt(capacity) / E) until the router sharpens;
      - attention's softmax average: its output magnitude depends on the attention entropy (as in EDM2);
      - everything outside the blocks (patch, timestep and caption embedders, mixer maps, final layer): they
        set the input and output scales (the final layer starts at zero output), and the released layout for
        them is kept. Blocks' outputs are not clipped (EDM2's +-256 clip is an fp16 safety net; bf16 needs none).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        dim: int = 1152,
        depth: int = 28,
        head_dim: int = 64,
        multiple_of: int = 256,
        caption_channels: int = 1024,
        pos_interp_scale: float = 1.0,
        norm_eps: float = 1e-6,
        depth_init: bool = True,
        qkv_multipliers: Sequence[float] = (1.0,),
        ffn_multipliers: Sequence[float] = (4.0,),
        use_patch_mixer: bool = True,
        patch_mixer_depth: int = 4,
        patch_mixer_dim: int = 512,
        patch_mixer_qkv_ratio: float = 1.0,
        patch_mixer_mlp_ratio: float = 1.0,
        use_bias: bool = True,
        num_experts: int = 8,
        expert_capacity: float = 1,
        experts_every_n: int = 2,
        mp: bool = False,
        route_span: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if route_span is not None and (len(route_span) != 2 or not 0 <= route_span[0] < route_span[1] <= depth):
            raise ValueError(
                f"route_span must be (start, end) with 0 <= start < end <= depth {depth}, got {list(route_span)}"
            )
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if len(qkv_multipliers) != len(ffn_multipliers):
            raise ValueError("qkv_multipliers and ffn_multipliers must have the same length")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.dim = dim
        self.head_dim = head_dim
        self.caption_channels = caption_channels
        self.pos_interp_scale = pos_interp_scale
        self.use_patch_mixer = use_patch_mixer
        self.mp = mp
        self.route_span = None if route_span is None else (int(route_span[0]), int(route_span[1]))
        self.grid_size = input_size // patch_size
        num_tokens = self.grid_size**2

        self.x_embedder = PatchEmbed(patch_size, in_channels, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.register_buffer("pos_embed", sincos_2d(self.grid_size, self.grid_size, dim, pos_interp_scale)[None])
        self.y_embedder = CaptionProjection(caption_channels, dim, norm_eps)
        self.y_emb_preprocess = CaptionRefiner(dim, head_dim, multiple_of, norm_eps, use_bias, mp)
        self.pooled_y_emb_process = NormedMlp(dim, dim, norm_eps)

        def block(width: int, qkv: float, mlp: float, moe: bool, out_std: float) -> DiTBlock:
            return DiTBlock(
                width, dim, head_dim, qkv, mlp, multiple_of, norm_eps, use_bias, moe, num_experts,
                expert_capacity, out_std, mp,
            )

        self.patch_mixer = nn.ModuleList()
        if use_patch_mixer:
            mixer_std = 0.02 / (2 * depth) ** 0.5
            self.patch_mixer.extend(
                block(patch_mixer_dim, patch_mixer_qkv_ratio, patch_mixer_mlp_ratio, moe, mixer_std)
                for moe in mixer_moe_blocks(patch_mixer_depth, experts_every_n)
            )
            if patch_mixer_dim != dim:
                self.patch_mixer_map_xin = self._projection(dim, patch_mixer_dim, norm_eps, use_bias)
                self.patch_mixer_map_xout = self._projection(patch_mixer_dim, dim, norm_eps, use_bias)
                self.patch_mixer_map_y = self._projection(dim, patch_mixer_dim, norm_eps, use_bias)
            else:
                self.patch_mixer_map_xin = self.patch_mixer_map_xout = self.patch_mixer_map_y = nn.Identity()

        qkv_ratios = per_block_ratios(qkv_multipliers, depth)
        mlp_ratios = per_block_ratios(ffn_multipliers, depth)
        self.blocks = nn.ModuleList(
            block(
                dim, qkv_ratios[i], mlp_ratios[i], moe,
                0.02 / (2 * (i + 1)) ** 0.5 if depth_init else 0.02 / (2 * depth) ** 0.5,
            )
            for i, moe in enumerate(backbone_moe_blocks(depth, experts_every_n))
        )
        self.register_buffer("mask_token", torch.zeros(1, 1, patch_size**2 * self.out_channels))
        if mp:
            self.register_buffer("magnitude_preserving", torch.ones(()))
        self.final_layer = FinalLayer(dim, patch_size, self.out_channels, norm_eps)
        self.num_tokens = num_tokens
        mark_compile_regions([self.y_emb_preprocess, *self.patch_mixer, *self.blocks])
        self.initialize_weights()

    @staticmethod
    def _projection(in_dim: int, out_dim: int, norm_eps: float, use_bias: bool) -> nn.Sequential:
        return nn.Sequential(layer_norm(in_dim, norm_eps), nn.Linear(in_dim, out_dim, bias=use_bias))

    def initialize_weights(self) -> None:
        """Xavier on linears with zero biases, then the MicroDiT scheme: normal(0.02) embedding MLPs,
        trunc-normal blocks with depth-scaled output projections, zero adaLN and output layers (adaLN-Zero).
        MP layers keep their N(0, 1) init."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        conv = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(conv.view(conv.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for mlp in (self.y_embedder.y_proj, self.pooled_y_emb_process):
            nn.init.normal_(mlp.fc1.weight, std=0.02)
            nn.init.normal_(mlp.fc2.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in [*self.patch_mixer, *self.blocks]:
            block.init_weights()
        self.y_emb_preprocess.init_weights()
        self.final_layer.init_weights()

    # ----------------------------------------------------------------------------------------------------------

    def embed_caption(
        self, y: torch.Tensor, caption_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption states (N, 1, L, C_txt) or (N, L, C_txt) -> refined tokens (N, L, D), pooled (N, D).

        caption_mask: optional (N, L) bool, True on real tokens: padded tokens are then neither attended to by
        the refiner nor pooled. None treats every token as real (the original's behaviour).
        """
        if y.dim() == 4:
            y = y.squeeze(1)
        if y.dim() != 3 or y.shape[-1] != self.caption_channels:
            raise ValueError(
                f"caption embedding must be (N, 1, L, {self.caption_channels}) or (N, L, {self.caption_channels}),"
                f" got {tuple(y.shape)}"
            )
        if caption_mask is None:
            tokens = self.y_emb_preprocess(self.y_embedder(y))
            return tokens, self.pooled_y_emb_process(tokens.mean(dim=1))
        if caption_mask.shape != y.shape[:2] or caption_mask.dtype != torch.bool:
            raise ValueError(f"caption_mask must be (N, L) = {tuple(y.shape[:2])} bool, got "
                             f"{tuple(caption_mask.shape)} {caption_mask.dtype}")
        # A data-dependent check: a graph break inside a compiled forward, so it runs in eager mode only.
        if not torch.compiler.is_compiling() and not caption_mask.any(dim=1).all():
            raise ValueError("caption_mask has a caption without any real token")
        tokens = self.y_emb_preprocess(self.y_embedder(y), caption_mask)
        weights = caption_mask.to(tokens.dtype).unsqueeze(-1)
        return tokens, self.pooled_y_emb_process((tokens * weights).sum(dim=1) / weights.sum(dim=1))

    def forward_without_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        mask_ratio: float = 0.0,
        caption_mask: torch.Tensor | None = None,
        route_ratio: float = 0.0,
    ) -> dict[str, torch.Tensor | None]:
        """x: (N, C, H, W) preconditioned latents; t: (N,), (1,) or scalar c_noise; y: caption states;
        caption_mask: optional (N, L) bool, True on real caption tokens (see `embed_caption`); route_ratio: share
        of the backbone's tokens that skip the blocks of `route_span` (token routing, see the class docstring).

        Returns {'sample': (N, C, H, W), 'mask': (N, T) with 1 = dropped token, or None when nothing is masked}.
        """
        n, _, height, width = x.shape
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        caption, pooled = self.embed_caption(y, caption_mask)
        c = self.t_embedder(torch.as_tensor(t, device=x.device).reshape(-1).expand(n)) + pooled

        if self.use_patch_mixer:
            tokens = self.patch_mixer_map_xin(tokens)
            mixer_caption = self.patch_mixer_map_y(caption)
            for block in self.patch_mixer:
                tokens = block(tokens, mixer_caption, c, caption_mask)

        token_mask = None
        if mask_ratio > 0:
            token_mask = random_token_mask(n, tokens.shape[1], mask_ratio, x.device)
            tokens = gather_tokens(tokens, token_mask.keep_indices)

        if self.use_patch_mixer:
            tokens = self.patch_mixer_map_xout(tokens)  # after masking: only kept tokens pay for it
        tokens = self._backbone(tokens, caption, c, caption_mask, route_ratio)
        patches = self.final_layer(tokens, c)

        if token_mask is not None:
            patches = restore_tokens(patches, token_mask.restore_indices, self.mask_token)
        mask = None if token_mask is None else token_mask.mask
        return {"sample": self.unpatchify(patches, grid_h, grid_w), "mask": mask}

    def routed_blocks(self, route_ratio: float) -> range:
        """Indices of the backbone blocks that `route_ratio` routes tokens around: empty for 0, else `route_span`
        (a ValueError when the DiT was built without one)."""
        if route_ratio == 0:
            return range(0)
        if self.route_span is None:
            raise ValueError(f"route_ratio {route_ratio} needs a DiT built with a route_span (the blocks to route "
                             "tokens around)")
        return range(*self.route_span)

    def _backbone(
        self, tokens: torch.Tensor, caption: torch.Tensor, c: torch.Tensor, caption_mask: torch.Tensor | None,
        route_ratio: float,
    ) -> torch.Tensor:
        """The backbone blocks: tokens (N, K, D) -> (N, K, D). With route_ratio, blocks[start:end] see a random
        (N, int(K (1 - route_ratio)), D) subset; the other tokens come out of the span unchanged, in place."""

        def run(blocks: Sequence[nn.Module], h: torch.Tensor) -> torch.Tensor:
            for block in blocks:
                h = block(h, caption, c, caption_mask)
            return h

        span = self.routed_blocks(route_ratio)
        if not span:
            return run(self.blocks, tokens)
        tokens = run(self.blocks[:span.start], tokens)
        n, k, _ = tokens.shape
        kept = random_token_mask(n, k, route_ratio, tokens.device, ratio_name="route_ratio").keep_indices
        processed = run(self.blocks[span.start:span.stop], gather_tokens(tokens, kept))
        tokens = scatter_tokens(tokens, kept, processed)
        return run(self.blocks[span.stop:], tokens)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg: float = 1.0,
        mask_ratio: float = 0.0,
        caption_mask: torch.Tensor | None = None,
        route_ratio: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """Classifier-free guidance (the samplers' `guided_denoiser`, one doubled batch): the null condition is
        an all-zeros caption embedding (with the same caption mask). Returns {'sample': (N, C, H, W)}."""
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        cond, null = {"y": y}, {"y": torch.zeros_like(y)}
        if caption_mask is not None:
            cond["caption_mask"] = null["caption_mask"] = caption_mask

        def network(x_in: torch.Tensor, t_in: torch.Tensor, condition: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.forward_without_cfg(
                x_in, t_in, mask_ratio=mask_ratio, route_ratio=route_ratio, **condition
            )["sample"]

        return {"sample": guided_denoiser(network, cond, null, cfg)(x, t)}

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg: float = 1.0,
        mask_ratio: float = 0.0,
        caption_mask: torch.Tensor | None = None,
        route_ratio: float = 0.0,
    ) -> dict[str, torch.Tensor | None]:
        """`forward_with_cfg` when cfg != 1, else `forward_without_cfg` (the original's entry point)."""
        if cfg != 1.0:
            return self.forward_with_cfg(x, t, y, cfg, mask_ratio, caption_mask, route_ratio)
        return self.forward_without_cfg(x, t, y, mask_ratio, caption_mask, route_ratio)

    def unpatchify(self, patches: torch.Tensor, grid_h: int | None = None, grid_w: int | None = None) -> torch.Tensor:
        """(N, T, p*p*C) with per-token layout (p_row, p_col, channel) -> (N, C, grid_h * p, grid_w * p)."""
        grid_h = grid_h or self.grid_size
        grid_w = grid_w or self.grid_size
        p, c = self.patch_size, self.out_channels
        x = patches.reshape(patches.shape[0], grid_h, grid_w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(patches.shape[0], c, grid_h * p, grid_w * p)

    # ----------------------------------------------------------------------------------------------------------

    def forward_flops(self, mask_ratio: float = 0.0, caption_length: int = 77, route_ratio: float = 0.0) -> int:
        """Analytic matmul FLOPs (2 per multiply-add) of one forward pass, per image.

        Counts every linear layer, convolution, attention product (QK^T and AV) and MoE expert at the token
        counts they see: the mixer on all T tokens, the backbone and final layer on K = int(T (1 - mask_ratio))
        tokens, except the blocks of `route_span`, on int(K (1 - route_ratio)) when route_ratio > 0.
        Element-wise work (norms, activations, softmax) is not counted, as in `FlopCounterMode` and MFU practice;
        nor is the weight normalisation of MP layers, element-wise work on the parameters (O(params) per forward,
        independent of the token count), so an MP model counts the same FLOPs as the standard one.
        """
        return sum(flops for _, flops in self.flop_breakdown(mask_ratio, caption_length, route_ratio))

    def flop_breakdown(
        self, mask_ratio: float = 0.0, caption_length: int = 77, route_ratio: float = 0.0
    ) -> list[tuple[str, int]]:
        """(component name, forward FLOPs per image) pairs; see `forward_flops`."""
        t_all, t_kept, length = self.num_tokens, num_kept_tokens(self.num_tokens, mask_ratio), caption_length
        t_routed, routed = num_kept_tokens(t_kept, route_ratio), self.routed_blocks(route_ratio)
        d = self.dim

        def linear(tokens: int, layer: nn.Module) -> int:
            return 2 * tokens * layer.weight.numel()  # (out, in) weight of nn.Linear or an MP linear

        breakdown = [
            ("patch_embed", 2 * t_all * self.x_embedder.proj.weight[0].numel() * d),
            ("timestep", linear(1, self.t_embedder.mlp[0]) + linear(1, self.t_embedder.mlp[2])),
            ("caption_projection",
             linear(length, self.y_embedder.y_proj.fc1) + linear(length, self.y_embedder.y_proj.fc2)),
            ("caption_refiner", _attention_flops(self.y_emb_preprocess.attn, length, length)
             + _ffn_flops(self.y_emb_preprocess.mlp, length)),
            ("pooled_caption", linear(1, self.pooled_y_emb_process.fc1) + linear(1, self.pooled_y_emb_process.fc2)),
        ]
        if self.use_patch_mixer:
            maps = 0
            if isinstance(self.patch_mixer_map_xin, nn.Sequential):
                maps = (linear(t_all, self.patch_mixer_map_xin[1]) + linear(length, self.patch_mixer_map_y[1])
                        + linear(t_kept, self.patch_mixer_map_xout[1]))
            breakdown.append(("mixer_maps", maps))
            breakdown.append(("patch_mixer", sum(_block_flops(b, t_all, length) for b in self.patch_mixer)))
        breakdown.append(("backbone", sum(_block_flops(b, t_routed if i in routed else t_kept, length)
                                          for i, b in enumerate(self.blocks))))
        breakdown.append(("final_layer", linear(1, self.final_layer.adaLN_modulation[1])
                          + linear(t_kept, self.final_layer.linear)))
        return breakdown

    def training_flops(self, mask_ratio: float = 0.0, caption_length: int = 77, route_ratio: float = 0.0) -> int:
        """FLOPs of one training step per image: forward + backward (2x forward), frozen encoders excluded."""
        return 3 * self.forward_flops(mask_ratio, caption_length, route_ratio)


def _attention_flops(attn: nn.Module, queries: int, keys: int) -> int:
    """Projections plus QK^T and AV of a SelfAttention (queries == keys) or CrossAttention module.

    Linear layers are read through their (out, in) weights, the same for nn.Linear and MP linear layers.
    """
    if hasattr(attn, "qkv"):
        hidden = attn.qkv.weight.shape[0] // 3
        projections = 2 * queries * (attn.qkv.weight.numel() + attn.proj.weight.numel())
    else:
        hidden = attn.q_linear.weight.shape[0]
        projections = (2 * queries * (attn.q_linear.weight.numel() + attn.proj.weight.numel())
                       + 2 * keys * attn.kv_linear.weight.numel())
    return projections + 2 * 2 * queries * keys * hidden


def _ffn_flops(ffn: nn.Module, tokens: int) -> int:
    if isinstance(ffn, SwiGLU):
        return 2 * tokens * 3 * ffn.w1.weight.numel()
    assert isinstance(ffn, ExpertChoiceMoE)
    experts, dim, hidden = ffn.w1.shape
    k = tokens_per_expert(tokens, experts, ffn.capacity)
    return 2 * tokens * dim * experts + 2 * experts * k * 2 * dim * hidden


def _block_flops(block: DiTBlock, tokens: int, caption_length: int) -> int:
    adaln = block.adaLN_modulation[1]
    return (2 * adaln.in_features * adaln.out_features
            + _attention_flops(block.attn, tokens, tokens)
            + _attention_flops(block.cross_attn, tokens, caption_length)
            + _ffn_flops(block.mlp, tokens))


# --------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------


def _microdit(
    depth: int,
    dim: int,
    head_dim: int,
    mixer_depth: int,
    mixer_dim: int,
    caption_channels: int = 1024,
    qkv_ratio: Sequence[float] = (0.5, 1.0),
    mlp_ratio: Sequence[float] = (0.5, 4.0),
    pos_interp_scale: float = 1.0,
    input_size: int = 32,
    num_experts: int = 8,
    expert_capacity: float = 2.0,
    experts_every_n: int = 2,
    in_channels: int = 4,
    **kwargs,
) -> DiT:
    """The MicroDiT recipe: linear layer-wise scaling, patch-mixer, expert-choice MoE every 2nd block, no biases."""
    config = dict(
        input_size=input_size, patch_size=2, in_channels=in_channels, dim=dim, depth=depth, head_dim=head_dim,
        multiple_of=256, caption_channels=caption_channels, pos_interp_scale=pos_interp_scale, norm_eps=1e-6,
        depth_init=True,
        qkv_multipliers=np.linspace(qkv_ratio[0], qkv_ratio[1], num=depth).tolist(),
        ffn_multipliers=np.linspace(mlp_ratio[0], mlp_ratio[1], num=depth).tolist(),
        use_patch_mixer=True, patch_mixer_depth=mixer_depth, patch_mixer_dim=mixer_dim, patch_mixer_qkv_ratio=1.0,
        patch_mixer_mlp_ratio=4.0, use_bias=False, num_experts=num_experts, expert_capacity=expert_capacity,
        experts_every_n=experts_every_n,
    )
    config.update(kwargs)
    return DiT(**config)


def MicroDiT_XL_2(**kwargs) -> DiT:  # noqa: N802  (the original's public name)
    """The paper model: 1,165.4M parameters (28 blocks at 1024, mixer 6 x 768)."""
    return _microdit(depth=28, dim=1024, head_dim=64, mixer_depth=6, mixer_dim=768, **kwargs)


def MicroDiT_Tiny_2(**kwargs) -> DiT:  # noqa: N802
    """200.7M parameters (16 blocks at 512, mixer 4 x 512)."""
    return _microdit(depth=16, dim=512, head_dim=32, mixer_depth=4, mixer_dim=512, **kwargs)


def MicroDiT_XS_2(**kwargs) -> DiT:  # noqa: N802
    """CPU-sized: 8 blocks at 256, mixer 2 x 256, 4 experts (same classes and recipe)."""
    kwargs.setdefault("num_experts", 4)
    return _microdit(depth=8, dim=256, head_dim=32, mixer_depth=2, mixer_dim=256, **kwargs)


def MicroDiT_XXS_2(**kwargs) -> DiT:  # noqa: N802
    """Test-sized: 4 blocks at 128, mixer 2 x 128, 4 experts (same classes and recipe)."""
    kwargs.setdefault("num_experts", 4)
    return _microdit(depth=4, dim=128, head_dim=32, mixer_depth=2, mixer_dim=128, **kwargs)


DIT_PRESETS: dict[str, Callable[..., DiT]] = {
    "MicroDiT_XL_2": MicroDiT_XL_2,
    "MicroDiT_Tiny_2": MicroDiT_Tiny_2,
    "MicroDiT_XS_2": MicroDiT_XS_2,
    "MicroDiT_XXS_2": MicroDiT_XXS_2,
}


def create_dit(name: str, **kwargs) -> DiT:
    """Build a preset by name, e.g. `create_dit("MicroDiT_XL_2", input_size=64, pos_interp_scale=2.0)`."""
    if name not in DIT_PRESETS:
        raise KeyError(f"unknown DiT preset {name!r}; available: {sorted(DIT_PRESETS)}")
    return DIT_PRESETS[name](**kwargs)
