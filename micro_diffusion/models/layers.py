"""Building blocks of MicroDiT: embeddings, attention with QK-norm, SwiGLU, expert-choice MoE, adaLN-Zero.

Every module here is plain PyTorch, keeps the parameter names of the original MicroDiT (so released checkpoints
load with `strict=True`), runs attention through `F.scaled_dot_product_attention`, and has no Python loop over
tokens or experts, so it compiles with `torch.compile` and runs under bf16 autocast.

The transformer blocks take `mp`: their learned linear layers become magnitude-preserving (MPConv linears, EDM2)
and their residual joins MP sums; see `DiT` for what exactly is MP and what stays standard.

Shape legend: N batch, T image tokens, L caption tokens, D model width, H hidden width, E experts,
K tokens per expert.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from micro_diffusion.models.mp_layers import RES_BALANCE, MPConv, mp_gelu, mp_silu, mp_sum, mp_weight, normalize_


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= `value`."""
    return multiple * ((value + multiple - 1) // multiple)


def layer_norm(dim: int, eps: float) -> nn.LayerNorm:
    """LayerNorm with a learned scale and no bias (the norm used throughout MicroDiT)."""
    return nn.LayerNorm(dim, eps=eps, bias=False)


def tanh_gelu() -> nn.GELU:
    return nn.GELU(approximate="tanh")


def linear_layer(in_features: int, out_features: int, bias: bool, mp: bool = False) -> nn.Module:
    """A learned linear layer (..., in) -> (..., out): nn.Linear, or with `mp` a bias-free MP linear layer (MPConv
    with kernel ()). Both store `weight` (out, in), so an MP model keeps the key layout of a bias-free one."""
    if mp and bias:
        raise ValueError("MP linear layers have no bias: use use_bias=False with mp=True")
    return MPConv(in_features, out_features, ()) if mp else nn.Linear(in_features, out_features, bias=bias)


def init_linear_(layer: nn.Module, std: float) -> None:
    """Trunc-normal init of a standard linear layer's weight, zeros when std is 0. MP layers keep their N(0, 1)
    init: only the direction of their weight rows matters, and a zero row could not be normalised."""
    if isinstance(layer, MPConv):
        return
    if std > 0:
        nn.init.trunc_normal_(layer.weight, std=std)
    else:
        nn.init.zeros_(layer.weight)


def residual(x: torch.Tensor, branch: torch.Tensor, mp: bool) -> torch.Tensor:
    """Residual join of x and branch (same shapes): x + branch, or with `mp` the unit-variance
    mp_sum(x, branch, 0.3) (EDM2's residual balance: the main path keeps weight 0.7) in x's dtype (under
    autocast the branch is bf16 and the residual stream float32)."""
    return mp_sum(x, branch.to(x.dtype), RES_BALANCE) if mp else x + branch


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation. x: (N, T, D); shift, scale: (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# --------------------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------------------


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """MAE-style 1-D sin-cos table. positions: (P,) float64 -> (P, dim), first half sin, second half cos."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(grid_height: int, grid_width: int, dim: int, pos_interp_scale: float = 1.0) -> torch.Tensor:
    """Fixed 2-D position table for a row-major token grid -> (grid_height * grid_width, dim) float32.

    The first dim/2 channels encode the column index, the last dim/2 the row index. Coordinates are divided by
    `pos_interp_scale`, so a 64x64 latent with scale 2 sees the same coordinate range (0 .. 15.5) as a 32x32 one
    with scale 1 (PixArt-style interpolation for the resolution change).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding width must be divisible by 4, got {dim}")
    rows = torch.arange(grid_height, dtype=torch.float64) / pos_interp_scale
    cols = torch.arange(grid_width, dtype=torch.float64) / pos_interp_scale
    row_grid, col_grid = torch.meshgrid(rows, cols, indexing="ij")
    col_emb = sincos_1d(col_grid.reshape(-1), dim // 2)
    row_emb = sincos_1d(row_grid.reshape(-1), dim // 2)
    return torch.cat([col_emb, row_emb], dim=1).float()


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: (N, C, H, W) -> (N, H/p * W/p, D), tokens row-major."""

    def __init__(self, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Embeds the EDM noise conditioning c_noise = ln(sigma) / 4 (a float per sample, not an integer step).

    (N,) -> 512 sinusoidal features (cos half first, max period 10000) -> Linear -> tanh-GELU -> Linear -> (N, D).
    """

    frequency_dim = 512

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(self.frequency_dim, dim), tanh_gelu(), nn.Linear(dim, dim))
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise.float()[:, None] * self.freqs[None]
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class NormedMlp(nn.Module):
    """Linear -> tanh-GELU -> LayerNorm -> Linear, with biases (caption projection and pooled-caption MLP)."""

    def __init__(self, in_dim: int, dim: int, norm_eps: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.act = tanh_gelu()
        self.norm = layer_norm(dim, norm_eps)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class CaptionProjection(nn.Module):
    """Per-token projection of text-encoder states to the model width: (N, L, C_txt) -> (N, L, D)."""

    def __init__(self, caption_channels: int, dim: int, norm_eps: float) -> None:
        super().__init__()
        self.y_proj = NormedMlp(caption_channels, dim, norm_eps)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.y_proj(caption)


# --------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------


def attention_width(dim: int, qkv_ratio: float, head_dim: int) -> int:
    """Self-attention width under layer-wise scaling: `dim` at ratio 1, else rounded up to 2 * head_dim."""
    if qkv_ratio == 1:
        return dim
    return round_up(int(dim * qkv_ratio), 2 * head_dim)


def multi_head_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    norm_eps: float,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """QK-normalised multi-head attention through SDPA.

    q: (N, T, H); k, v: (N, S, H) -> (N, T, H). The QK-norm is one parameter-free LayerNorm over the whole q (and
    k) vector, all heads jointly, as in MicroDiT (not a per-head norm). key_mask: optional (N, S) bool, True on
    the keys every query may attend to (each row needs at least one True); None attends to all keys.
    """
    width = q.shape[-1]
    q = F.layer_norm(q, (width,), eps=norm_eps)
    k = F.layer_norm(k, (width,), eps=norm_eps)
    n, t, _ = q.shape
    q, k, v = (z.unflatten(-1, (num_heads, width // num_heads)).transpose(1, 2) for z in (q, k, v))
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # broadcast over heads and queries
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, heads, T, head_dim)
    return out.transpose(1, 2).reshape(n, t, width)


class SelfAttention(nn.Module):
    """Self-attention at a (possibly compressed) hidden width: (N, T, D) -> (N, T, D). `mp`: MP projections."""

    def __init__(
        self, dim: int, hidden_dim: int, head_dim: int, use_bias: bool, norm_eps: float, mp: bool = False
    ) -> None:
        super().__init__()
        if hidden_dim % head_dim:
            raise ValueError(f"attention width {hidden_dim} is not a multiple of head_dim {head_dim}")
        self.num_heads = hidden_dim // head_dim
        self.norm_eps = norm_eps
        self.qkv = linear_layer(dim, 3 * hidden_dim, use_bias, mp)
        self.proj = linear_layer(hidden_dim, dim, use_bias, mp)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, T, D); key_mask: optional (N, T) bool, True on the tokens that may be attended to."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(multi_head_attention(q, k, v, self.num_heads, self.norm_eps, key_mask))

    def init_weights(self, out_std: float) -> None:
        init_linear_(self.qkv, 0.02)
        init_linear_(self.proj, out_std)


class CrossAttention(nn.Module):
    """Image tokens attend to caption tokens, full width: x (N, T, D), caption (N, L, D) -> (N, T, D).

    Without a caption mask every caption token is attended to, padding included, as in the original (released
    checkpoints' behaviour); with one, padded tokens are not. `mp`: MP projections.
    """

    def __init__(self, dim: int, head_dim: int, use_bias: bool, norm_eps: float, mp: bool = False) -> None:
        super().__init__()
        self.num_heads = dim // head_dim
        self.norm_eps = norm_eps
        self.q_linear = linear_layer(dim, dim, use_bias, mp)
        self.kv_linear = linear_layer(dim, 2 * dim, use_bias, mp)
        self.proj = linear_layer(dim, dim, use_bias, mp)

    def forward(
        self, x: torch.Tensor, caption: torch.Tensor, caption_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (N, T, D); caption: (N, L, D); caption_mask: optional (N, L) bool, True on real tokens."""
        k, v = self.kv_linear(caption).chunk(2, dim=-1)
        return self.proj(multi_head_attention(self.q_linear(x), k, v, self.num_heads, self.norm_eps, caption_mask))

    def init_weights(self, out_std: float) -> None:
        init_linear_(self.q_linear, 0.02)
        init_linear_(self.kv_linear, 0.02)
        init_linear_(self.proj, out_std)


# --------------------------------------------------------------------------------------------------------------
# Feed-forward
# --------------------------------------------------------------------------------------------------------------


def swiglu_hidden(dim: int, mlp_ratio: float, multiple_of: int) -> int:
    """SwiGLU hidden width: 2/3 of int(dim * ratio), rounded up to `multiple_of` (keeps FLOPs of a GELU MLP)."""
    return round_up(int(2 * int(dim * mlp_ratio) / 3), multiple_of)


def expert_hidden(dim: int, mlp_ratio: float, multiple_of: int) -> int:
    """Hidden width of one MoE expert (a GELU MLP, no 2/3 factor)."""
    return round_up(int(dim * mlp_ratio), multiple_of)


class SwiGLU(nn.Module):
    """Dense feed-forward w3(SiLU(w1 x) * w2 x): (N, T, D) -> (N, T, D).

    `mp`: MP linear layers and mp_silu; for independent unit-variance w1 x and w2 x the product then has unit RMS.
    """

    def __init__(self, dim: int, hidden_dim: int, use_bias: bool, mp: bool = False) -> None:
        super().__init__()
        self.w1 = linear_layer(dim, hidden_dim, use_bias, mp)
        self.w2 = linear_layer(dim, hidden_dim, use_bias, mp)
        self.w3 = linear_layer(hidden_dim, dim, use_bias, mp)
        self.act = mp_silu if mp else F.silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.act(self.w1(x)) * self.w2(x))

    def init_weights(self, out_std: float) -> None:
        init_linear_(self.w1, 0.02)
        init_linear_(self.w2, out_std)
        init_linear_(self.w3, out_std)


def tokens_per_expert(num_tokens: int, num_experts: int, capacity: float) -> int:
    """Expert-choice capacity k = int(capacity * T / E), at least 1 (masking shrinks T, and so k)."""
    return max(1, min(num_tokens, int(capacity * num_tokens / num_experts)))


class ExpertChoiceMoE(nn.Module):
    """Expert-choice mixture of GELU experts (Zhou et al. 2022), routed within each sample.

    A router gives each token a softmax over experts; each expert then picks its top-k tokens of the sample by
    that probability (k = capacity * T / E), processes them, and its outputs are scaled by the routing probability
    and summed back into their token positions. A token may be picked by several experts or by none (then its FFN
    update is zero and the residual passes through). No auxiliary balancing loss is needed: every expert takes
    exactly k tokens by construction.

    Dispatch is a gather and combine a scatter-add over (N, E*K) indices: no one-hot (N, E, K, T) tensors (the
    original's einsum form costs O(E K T D) FLOPs and memory) and no Python loop over experts.

    `mp`: MP experts. The batched weights w1 (E, D, H) and w2 (E, H, D) are normalised along their fan-in axis 1
    as MPConv normalises its rows (in the graph, and forced in place in a training forward), and GELU becomes
    mp_gelu. The router and the probability-weighted combine stay standard (see `DiT`).
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, capacity: float, mp: bool = False) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.capacity = capacity
        self.mp = mp
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.act = mp_gelu if mp else nn.GELU()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert choice. x: (N, T, D) -> weights (N, E, K) routing probabilities, indices (N, E, K) token ids."""
        k = tokens_per_expert(x.shape[1], self.num_experts, self.capacity)
        probs = self.gate(x).float().softmax(dim=-1)  # (N, T, E)
        weights, indices = probs.transpose(1, 2).topk(k, dim=-1)
        return weights, indices

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The expert weights as applied, w1 (E, D, H) and w2 (E, H, D): as stored, or MP-normalised with `mp`."""
        if self.mp:
            return mp_weight(self.w1, self.training, dim=1), mp_weight(self.w2, self.training, dim=1)
        return self.w1, self.w2

    def normalize_weight_(self) -> None:
        """Forced weight normalisation of MP experts in place (see `mp_layers.normalize_weights_`); else nothing."""
        if self.mp:
            normalize_(self.w1, dim=1)
            normalize_(self.w2, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        weights, indices = self.route(x)
        e, k = indices.shape[1:]
        flat_indices = indices.reshape(n, e * k, 1).expand(n, e * k, d)
        chosen = x.gather(1, flat_indices).view(n, e, k, d)
        w1, w2 = self.expert_weights()
        hidden = self.act(torch.einsum("nekd,edh->nekh", chosen, w1.to(chosen.dtype)))
        expert_out = torch.einsum("nekh,ehd->nekd", hidden, w2.to(hidden.dtype))
        expert_out = expert_out * weights.unsqueeze(-1).to(expert_out.dtype)
        combined = torch.zeros_like(x, dtype=expert_out.dtype)
        return combined.scatter_add(1, flat_indices, expert_out.reshape(n, e * k, d)).to(x.dtype)

    def init_weights(self, out_std: float) -> None:
        nn.init.trunc_normal_(self.gate.weight, std=0.02)
        if self.mp:  # N(0, 1), as MPConv: only the direction of each fan-in vector matters
            nn.init.normal_(self.w1)
            nn.init.normal_(self.w2)
        else:
            nn.init.trunc_normal_(self.w1, std=0.02)
            nn.init.trunc_normal_(self.w2, std=out_std)


# --------------------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------------------


class CaptionRefiner(nn.Module):
    """One pre-LN transformer block over the caption tokens: (N, L, D) -> (N, L, D); with a caption mask (N, L)
    (True on real tokens) no token attends to padding, else every token attends to all (the original).

    Its attention output projection and FFN down-projection start at zero, so it starts as the identity.
    `mp`: MP linear layers and MP residual sums (then it starts as a mix of 70 % input, 30 % branches).
    """

    def __init__(
        self, dim: int, head_dim: int, multiple_of: int, norm_eps: float, use_bias: bool, mp: bool = False
    ) -> None:
        super().__init__()
        self.mp = mp
        self.norm1 = layer_norm(dim, norm_eps)
        self.attn = SelfAttention(dim, dim, head_dim, use_bias, norm_eps, mp)
        self.norm2 = layer_norm(dim, norm_eps)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, 4.0, multiple_of), use_bias, mp)

    def forward(self, caption: torch.Tensor, caption_mask: torch.Tensor | None = None) -> torch.Tensor:
        caption = residual(caption, self.attn(self.norm1(caption), caption_mask), self.mp)
        return residual(caption, self.mlp(self.norm2(caption)), self.mp)

    def init_weights(self) -> None:
        self.attn.init_weights(out_std=0.02)
        self.mlp.init_weights(out_std=0.02)
        init_linear_(self.attn.proj, 0.0)
        init_linear_(self.mlp.w3, 0.0)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block shared by the patch-mixer and the backbone.

    x += gate_msa * SelfAttn(modulate(LN1 x)); x += CrossAttn(LN2 x, caption) (no modulation, no gate);
    x += gate_mlp * FFN(modulate(LN3 x)), the FFN being SwiGLU or an expert-choice MoE.

    With `mp` the attention, cross-attention and FFN use MP linear layers, every `x += g * branch` becomes
    x = mp_sum(x, (1 + g) * branch, 0.3), and the adaLN modulation stays a standard zero-initialised linear layer
    (see `DiT` for why).

    Args:
        dim: block width D. cond_dim: width of the conditioning vector c.
        qkv_ratio / mlp_ratio: layer-wise scaling of the self-attention width and the FFN hidden width.
        out_init_std: init std of the output projections (depth-dependent in the backbone; unused by MP layers).
        mp: magnitude-preserving block.
    """

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        head_dim: int,
        qkv_ratio: float,
        mlp_ratio: float,
        multiple_of: int,
        norm_eps: float,
        use_bias: bool,
        moe: bool,
        num_experts: int,
        expert_capacity: float,
        out_init_std: float,
        mp: bool = False,
    ) -> None:
        super().__init__()
        self.out_init_std = out_init_std
        self.mp = mp
        self.norm1 = layer_norm(dim, norm_eps)
        attn_width = attention_width(dim, qkv_ratio, head_dim)
        self.attn = SelfAttention(dim, attn_width, head_dim, use_bias, norm_eps, mp)
        self.cross_attn = CrossAttention(dim, head_dim, use_bias, norm_eps, mp)
        self.norm2 = layer_norm(dim, norm_eps)
        self.norm3 = layer_norm(dim, norm_eps)
        if moe:
            hidden = expert_hidden(dim, mlp_ratio, multiple_of)
            self.mlp: nn.Module = ExpertChoiceMoE(dim, hidden, num_experts, expert_capacity, mp)
        else:
            self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio, multiple_of), use_bias, mp)
        self.adaLN_modulation = nn.Sequential(tanh_gelu(), nn.Linear(cond_dim, 6 * dim, bias=True))

    def gated(self, branch: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """branch (N, T, D) times the adaLN gate (N, D): gate * branch, or with `mp` (1 + gate) * branch, so the
        zero-initialised gate passes a unit-variance branch to the MP sum (EDM2's (1 + g emb) modulation)."""
        gate = gate.unsqueeze(1)
        return (1 + gate) * branch if self.mp else gate * branch

    def forward(
        self, x: torch.Tensor, caption: torch.Tensor, c: torch.Tensor, caption_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (N, T, D); caption: (N, L, D); c: (N, cond_dim); caption_mask: optional (N, L) bool -> (N, T, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = residual(x, self.gated(self.attn(modulate(self.norm1(x), shift_msa, scale_msa)), gate_msa), self.mp)
        x = residual(x, self.cross_attn(self.norm2(x), caption, caption_mask), self.mp)
        return residual(x, self.gated(self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp)), gate_mlp), self.mp)

    def init_weights(self) -> None:
        self.attn.init_weights(self.out_init_std)
        self.cross_attn.init_weights(self.out_init_std)
        self.mlp.init_weights(self.out_init_std)
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)


class FinalLayer(nn.Module):
    """adaLN (shift and scale only) + LayerNorm + Linear to patch values: (N, T, D) -> (N, T, p*p*C)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, norm_eps: float) -> None:
        super().__init__()
        self.norm_final = layer_norm(dim, norm_eps)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(tanh_gelu(), nn.Linear(dim, 2 * dim, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))

    def init_weights(self) -> None:
        for linear in (self.adaLN_modulation[-1], self.linear):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
