"""Magnitude-preserving (MP) building blocks of EDM2 (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models"), config G.

Every operation here keeps unit-variance inputs at unit variance, so activation magnitudes neither grow nor shrink
through the network, and no layer has a bias:

  MPConv          convolution (kernel (k, k)) or linear layer (kernel ()) whose weight rows are normalised to unit
                  norm in the forward pass, and forced back to unit RMS in place while training
  mp_weight       the weight an MP layer applies (MPConv's, or any batched weight given its fan-in axis)
  mp_silu         SiLU(x) / 0.596, the RMS of SiLU over N(0, 1)
  mp_gelu         GELU(x) / 0.652, the RMS of (exact) GELU over N(0, 1)
  mp_sum, mp_cat  interpolation and concatenation rescaled to unit variance, with a balance t between the inputs
  MPFourier       sqrt(2) cos(2 pi (f c + phi)) with fixed random f ~ N(0, 1), phi ~ U(0, 1)
  pixel_norm      each pixel's channel vector scaled to unit RMS
  cosine_attention  self-attention on unit-RMS queries, keys and values (bounded logits)
  clip_activations  the +-256 clamp on block outputs, a safety net for fp16

Forced weight normalisation and EMA copies: MPConv overwrites its stored weight with the normalised one only when
the module is in training mode, autograd is recording and the weight requires a gradient, i.e. inside a training
forward pass. EMA or frozen copies (requires_grad False, or run in eval mode or under torch.no_grad) are therefore
never rewritten; their weights are still normalised inside the forward pass, so they compute the same function as
a renormalised copy would.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# RMS of SiLU(x) for x ~ N(0, 1): E[silu(x)^2] ~= 0.3557, sqrt ~= 0.596.
SILU_RMS = 0.596
# RMS of GELU(x) = x Phi(x) for x ~ N(0, 1): E[x^2 Phi(x)^2] = 1/3 + 1/(2 pi sqrt(3)) ~= 0.4252, sqrt ~= 0.6521.
GELU_RMS = math.sqrt(1 / 3 + 1 / (2 * math.pi * math.sqrt(3)))
RES_BALANCE = 0.3  # EDM2's weight of a residual branch in mp_sum (the main path keeps 0.7)
NORM_EPS = 1e-4


def normalize(x: Tensor, dim: int | tuple[int, ...] | None = None, eps: float = NORM_EPS) -> Tensor:
    """Scale x to unit RMS along `dim` (every dim but the first when None): x / (eps + |x| / sqrt(n)).

    The norm is computed in float32; the result keeps x's dtype and shape. For a weight (out, in, *kernel) with
    dim None this normalises each output unit's fan-in vector to norm sqrt(fan_in).
    """
    if dim is None:
        dim = tuple(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = eps + norm * math.sqrt(norm.numel() / x.numel())
    return x / norm.to(x.dtype)


def pixel_norm(x: Tensor, eps: float = NORM_EPS) -> Tensor:
    """Pixel norm: x (N, C, H, W) with each pixel's C-vector scaled to unit RMS."""
    return normalize(x, dim=1, eps=eps)


def mp_silu(x: Tensor) -> Tensor:
    """SiLU scaled to unit RMS for unit-normal inputs. Any shape."""
    return F.silu(x) / SILU_RMS


def mp_gelu(x: Tensor) -> Tensor:
    """Exact (erf) GELU scaled to unit RMS for unit-normal inputs. Any shape."""
    return F.gelu(x) / GELU_RMS


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """(1 - t) a + t b scaled back to unit variance for independent unit-variance a, b (same shapes).

    t is the weight of b: t = 0.3 keeps 70 % of a residual main path. The result has a's dtype (under autocast
    a float32 main path may meet a bf16 branch, which `lerp` would reject).
    """
    return a.lerp(b.to(a.dtype), t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: Tensor, b: Tensor, dim: int = 1, t: float = 0.5) -> Tensor:
    """Concatenate a (N_a channels along `dim`) and b (N_b) with unit overall RMS.

    The parts' total energies are in the ratio (1 - t)^2 : t^2 whatever the channel counts: a is scaled by
    C (1 - t) / sqrt(N_a) and b by C t / sqrt(N_b), with C = sqrt((N_a + N_b) / ((1 - t)^2 + t^2)).
    """
    size_a, size_b = a.shape[dim], b.shape[dim]
    scale = math.sqrt((size_a + size_b) / ((1 - t) ** 2 + t**2))
    weight_a = scale * (1 - t) / math.sqrt(size_a)
    weight_b = scale * t / math.sqrt(size_b)
    return torch.cat([weight_a * a, weight_b * b], dim=dim)


def clip_activations(x: Tensor, limit: float = 256.0) -> Tensor:
    """Clamp x to [-limit, limit] (EDM2 clips every block output at 256 as an fp16 safety net)."""
    return x.clamp(-limit, limit)


def cosine_attention(qkv: Tensor, num_heads: int) -> Tensor:
    """Multi-head self-attention over the pixels of a feature map, on unit-RMS queries, keys and values.

    qkv: (N, 3C, H, W), queries, keys and values stacked along channels (q = [:C], k = [C:2C], v = [2C:]); each
    head's d = C / num_heads channel vectors are pixel-normalised, so the logits q.k / sqrt(d) are cosine
    similarities times sqrt(d). Returns (N, C, H, W).
    """
    batch, channels3, height, width = qkv.shape
    channels = channels3 // 3
    if channels3 != 3 * channels or channels % num_heads:
        raise ValueError(f"qkv channels {channels3} are not 3 x a multiple of num_heads={num_heads}")
    q, k, v = qkv.reshape(batch, 3, num_heads, channels // num_heads, height * width).unbind(1)
    q, k, v = (normalize(part, dim=2).transpose(2, 3) for part in (q, k, v))  # (N, heads, HW, d)
    y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
    return y.transpose(2, 3).reshape(batch, channels, height, width)


@torch.no_grad()
def normalize_(weight: Tensor, dim: int | None = None) -> None:
    """Forced weight normalisation: overwrite `weight` in place with normalize(weight, dim), no gradient."""
    weight.copy_(normalize(weight, dim))


def mp_weight(weight: Tensor, training: bool, dim: int | None = None) -> Tensor:
    """The weight an MP layer applies: each fan-in vector (along `dim`; every dim but the first when None, as in
    (out, in, *kernel)) normalised to unit norm, normalize(weight, dim) / sqrt(fan_in). Same shape and dtype.

    When `training`, autograd is recording and the weight requires a gradient, the stored weight is first
    overwritten with its unit-RMS version (forced weight normalisation); EMA and frozen copies never are.
    """
    if training and torch.is_grad_enabled() and weight.requires_grad:
        normalize_(weight, dim)
    fan_in = weight[0].numel() if dim is None else weight.shape[dim]
    return normalize(weight, dim) / math.sqrt(fan_in)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel (k, k), 'same' padding) or linear layer (kernel ()), no bias.

    The weight (out, in, *kernel) is initialised N(0, 1). The forward pass uses
    w_i = gain * normalize(weight_i) / sqrt(fan_in), so every output row has unit norm and unit-variance inputs
    give unit-variance outputs; the normalisation is part of the graph, which projects gradients orthogonally to
    the weight. In a training forward pass the stored weight is first overwritten with its normalised version
    (forced weight normalisation, see the module docstring), so Adam updates act as fixed-size angular steps.

    learned_gain: multiply the output by a learned scalar initialised to 0 (EDM2's output and embedding gains),
    so the layer starts as the zero map.
    Input: (N, in, H, W) for a convolution, (..., in) for a linear layer.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...], learned_gain: bool = False):
        super().__init__()
        if len(kernel) not in (0, 2):
            raise ValueError(f"kernel must be () for a linear layer or (k, k) for a convolution, got {kernel}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self.gain = nn.Parameter(torch.zeros(())) if learned_gain else None

    @property
    def fan_in(self) -> int:
        return self.weight[0].numel()

    def normalize_weight_(self) -> None:
        """Forced weight normalisation: overwrite the stored weight with its unit-RMS-per-row version."""
        normalize_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        weight = mp_weight(self.weight, self.training)
        if self.gain is not None:
            weight = weight * self.gain
        weight = weight.to(x.dtype)
        if weight.ndim == 2:
            return F.linear(x, weight)
        return F.conv2d(x, weight, padding=weight.shape[-1] // 2)


def normalize_weights_(module: nn.Module) -> None:
    """Forced weight normalisation of every MP layer in `module`, in place: each submodule with a
    `normalize_weight_` method (MPConv, and MicroDiT's expert-choice MoE, whose method is a no-op unless its
    experts are MP).

    The forward pass already does this while training; call it after an optimiser step when the stored weights
    must be normalised before the next forward (e.g. before saving or exporting).
    """
    for layer in module.modules():
        if callable(getattr(layer, "normalize_weight_", None)):
            layer.normalize_weight_()


class MPFourier(nn.Module):
    """Fourier embedding of a scalar: sqrt(2) cos(2 pi (f x + phi)), fixed random f ~ N(0, 1), phi ~ U(0, 1).

    The sqrt(2) makes the output unit-RMS. The frequencies and phases are persistent buffers (checkpoints keep
    them). Input (N,), output (N, num_channels) in float32 arithmetic, returned in x's dtype.
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.register_buffer("frequencies", 2 * math.pi * torch.randn(num_channels))
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        angles = torch.outer(x.float(), self.frequencies.float()) + self.phases.float()
        return (math.sqrt(2) * torch.cos(angles)).to(x.dtype)
