"""Encoder and decoder networks: MLPs (with the ``iwae`` and ``pyro-example`` presets) and conv nets.

Encoders map images (..., C, H, W) to the Normal parameters (loc, scale) of q(z|x); decoders map
z (..., Z) to ``k*C`` output channels per pixel, where k is the likelihood's outputs per pixel.
Leading dimensions (particles, batch) pass through untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PyrovaeError

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus, "elu": nn.ELU, "gelu": nn.GELU}


@dataclass(frozen=True)
class Arch:
    """A network architecture: ``mlp`` with hidden sizes and activation, or ``conv``."""

    kind: str = "mlp"
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "tanh"
    z_dim: int = 50
    logit_bias: bool = False  # initialise the decoder's output bias at the logit of the training pixel mean


PRESETS: dict[str, Arch] = {
    "iwae": Arch("mlp", (200, 200), "tanh", 50, logit_bias=True),
    "pyro-example": Arch("mlp", (400,), "softplus", 50),
    "conv": Arch("conv", (32, 64), "relu", 32),
}


def mlp(sizes: list[int], activation: str = "tanh") -> nn.Sequential:
    """Linear layers of ``sizes`` with ``activation`` between them (none after the last)."""
    if activation not in ACTIVATIONS:
        raise PyrovaeError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def normal_head(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc, scale) of a Normal from a network output whose last dimension holds loc and log-scale halves."""
    loc, log_scale = h.chunk(2, dim=-1)
    return loc, log_scale.exp()


class MLPEncoder(nn.Module):
    """x -> hidden layers -> (loc, scale) with scale = exp(output), as in the IWAE paper."""

    def __init__(self, shape: tuple[int, ...], hidden: tuple[int, ...], z_dim: int, activation: str) -> None:
        super().__init__()
        self.shape = tuple(shape)
        d = int(torch.Size(shape).numel())
        self.net = mlp([d, *hidden, 2 * z_dim], activation)
        self.features_dim = hidden[-1] if hidden else d

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer, what the output layer reads (a flow guide's context, as in Kingma et al. 2016)."""
        return self.net[:-1](x.flatten(-len(self.shape)))

    def head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) from the last hidden layer."""
        return normal_head(self.net[-1](h))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.features(x))


class MLPDecoder(nn.Module):
    """z -> hidden layers -> k*C*H*W outputs, reshaped to (..., k*C, H, W)."""

    def __init__(self, shape: tuple[int, ...], hidden: tuple[int, ...], z_dim: int, activation: str, k: int = 1):
        super().__init__()
        self.out_shape = (k * shape[0], *shape[1:])
        d = int(torch.Size(self.out_shape).numel())
        self.net = mlp([z_dim, *reversed(hidden), d], activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).unflatten(-1, self.out_shape)

    def init_output_bias(self, bias: torch.Tensor) -> None:
        with torch.no_grad():
            self.net[-1].bias.copy_(bias.reshape(-1).to(self.net[-1].bias))


def _flat_batch(t: torch.Tensor, event_dims: int) -> tuple[torch.Tensor, torch.Size]:
    lead = t.shape[: t.dim() - event_dims]
    return t.reshape(-1, *t.shape[t.dim() - event_dims :]), lead


class ConvEncoder(nn.Module):
    """Two stride-2 convolutions and a linear layer, for 1x28x28 and 3x32x32 images."""

    def __init__(self, shape: tuple[int, ...], channels: tuple[int, ...], z_dim: int, activation: str) -> None:
        super().__init__()
        c, h, w = shape
        act = ACTIVATIONS[activation]
        self.conv = nn.Sequential(
            nn.Conv2d(c, channels[0], 4, 2, 1), act(), nn.Conv2d(channels[0], channels[1], 4, 2, 1), act()
        )
        self.features_dim = channels[1] * (h // 4) * (w // 4)
        self.fc = nn.Linear(self.features_dim, 2 * z_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened convolution output, what the output layer reads."""
        flat, lead = _flat_batch(x, 3)
        return self.conv(flat).flatten(1).reshape(*lead, -1)

    def head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) from the features."""
        return normal_head(self.fc(h))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.features(x))


class ConvDecoder(nn.Module):
    """A linear layer and two stride-2 transposed convolutions back to (k*C, H, W)."""

    def __init__(self, shape: tuple[int, ...], channels: tuple[int, ...], z_dim: int, activation: str, k: int = 1):
        super().__init__()
        c, h, w = shape
        self.grid = (channels[1], h // 4, w // 4)
        act = ACTIVATIONS[activation]
        self.fc = nn.Sequential(nn.Linear(z_dim, int(torch.Size(self.grid).numel())), act())
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(channels[1], channels[0], 4, 2, 1),
            act(),
            nn.ConvTranspose2d(channels[0], k * c, 4, 2, 1),
        )
        self.out_shape = (k * c, h, w)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        flat, lead = _flat_batch(z, 1)
        out = self.deconv(self.fc(flat).reshape(-1, *self.grid))
        return out.reshape(*lead, *self.out_shape)

    def init_output_bias(self, bias: torch.Tensor) -> None:
        # a transposed conv has one bias per channel: use the mean logit per channel
        with torch.no_grad():
            b = bias.reshape(self.out_shape[0], -1).mean(-1) if bias.numel() > 1 else bias.reshape(1)
            self.deconv[-1].bias.copy_(b.to(self.deconv[-1].bias).expand_as(self.deconv[-1].bias))


def make_networks(arch: Arch, shape: tuple[int, ...], k: int = 1) -> tuple[nn.Module, nn.Module]:
    """Build (encoder, decoder) for images of ``shape`` and ``k`` decoder outputs per pixel."""
    if arch.kind == "mlp":
        return (
            MLPEncoder(shape, arch.hidden, arch.z_dim, arch.activation),
            MLPDecoder(shape, arch.hidden, arch.z_dim, arch.activation, k),
        )
    if arch.kind == "conv":
        if len(shape) != 3 or shape[1] % 4 or shape[2] % 4 or len(arch.hidden) != 2:
            raise PyrovaeError(f"the conv arch needs (C, H, W) images with H, W divisible by 4, got {shape}")
        return (
            ConvEncoder(shape, arch.hidden, arch.z_dim, arch.activation),
            ConvDecoder(shape, arch.hidden, arch.z_dim, arch.activation, k),
        )
    raise PyrovaeError(f"unknown arch kind {arch.kind!r}; choose mlp or conv")


def logit(p: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)
