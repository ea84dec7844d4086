"""Test models, built with random weights. Each has a factory returning (model, inputs)."""

from __future__ import annotations

import torch
from torch import nn

from nativert.models import build


class Counter(nn.Module):
    """Updates a buffer in forward: the state must advance on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("steps", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps.add_(1.0)
        return self.fc(x) * self.steps


class MultiOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        h = self.fc(x)
        return {"sum": h + y, "pair": (torch.tanh(h), h.sum(dim=1))}


class SplitBySin(nn.Module):
    """Two linear blocks with a sin between them (sin is what test partitioners reject)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.sin(torch.relu(self.a(x)))) + 1.0


class TrainBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class LSTMHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class Embedder(nn.Module):
    """int64 token ids -> embedding -> mean -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(tokens).mean(dim=1))


@torch.library.custom_op("nativert_test::shift", mutates_args=())
def shift(x: torch.Tensor) -> torch.Tensor:
    """A custom op no delegate knows: it must stay in PyTorch."""
    return x + 0.5


@shift.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class WithCustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(shift(self.a(x))))


def make(name: str):
    torch.manual_seed(0)
    if name in ("mlp", "convnet", "transformer"):
        return build(name)
    if name == "counter":
        return Counter().eval(), (torch.randn(2, 4),)
    if name == "multi_output":
        return MultiOutput().eval(), (torch.randn(3, 6), torch.randn(3, 6))
    if name == "split_by_sin":
        return SplitBySin().eval(), (torch.randn(5, 8),)
    if name == "transformer":
        return build("transformer")
    if name == "lstm":
        return LSTMHead().eval(), (torch.randn(3, 5, 8),)
    if name == "embedding":
        return Embedder().eval(), (torch.randint(0, 50, (3, 7)),)
    if name == "custom_op":
        return WithCustomOp().eval(), (torch.randn(4, 8),)
    raise KeyError(name)
