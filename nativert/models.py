"""Small built-in models for `nativert demo`, the tests and the benchmarks (random weights)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 32, hidden: int = 64, d_out: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.nn.functional.gelu(self.fc2(x))
        return self.fc3(x)


class ConvNet(nn.Module):
    """Conv + BatchNorm + ReLU twice, pooled, then a linear head."""

    def __init__(self, channels: int = 3, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width * 2, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(width * 2)
        self.head = nn.Linear(width * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


class ConvBnRelu(nn.Module):
    """Four conv-bn-relu layers (32-64 channels), pooled, then a linear head: a model of
    milliseconds at 1x3x64x64, where fused convolutions show (benchmarks, autotune tests)."""

    def __init__(self) -> None:
        super().__init__()
        layers, channels = [], 3
        for width in (32, 64, 64, 64):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention (scaled_dot_product_attention) and an MLP, with residuals."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, seq, self.heads, dim // self.heads).transpose(1, 2)

        attn = nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, seq, dim))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


def _randomize_bn(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give batch norms non-trivial running stats so eval mode is a real test."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model


def build(
    name: str, *, seed: int = 0, batch: int = 4
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A built-in model in eval mode and example inputs for it."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name not in BUILTIN_MODELS:
        raise KeyError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    model, make_inputs = BUILTIN_MODELS[name]()
    with torch.no_grad():
        _randomize_bn(model, generator)
    return model.eval(), make_inputs(batch, generator)


BUILTIN_MODELS: dict[str, Callable[[], tuple[nn.Module, Callable]]] = {
    "mlp": lambda: (MLP(), lambda b, g: (torch.randn(b, 32, generator=g),)),
    "convnet": lambda: (ConvNet(), lambda b, g: (torch.randn(b, 3, 16, 16, generator=g),)),
    "transformer": lambda: (
        TransformerBlock(),
        lambda b, g: (torch.randn(b, 16, 32, generator=g),),
    ),
}
