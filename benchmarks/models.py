"""The benchmark suite's models, with random weights (nothing is downloaded).

Sizes are realistic for CPU inference: each model takes from a few hundred microseconds to
several milliseconds in eager PyTorch on 2 threads, so kernel quality shows, not only call
overhead (microsecond models hide it). Each factory returns (model in eval mode, example
inputs). BERT- and GPT-2-style encoders are built from `transformers` configs (the `bench`
extra installs it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nativert.models import ConvBnRelu, TransformerBlock


@torch.library.custom_op("nativert_suite::soft_clip", mutates_args=())
def soft_clip(x: torch.Tensor) -> torch.Tensor:
    """A custom op no delegate knows (ONNX cannot export it)."""
    return torch.tanh(x / 3.0) * 3.0


@soft_clip.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


class DeepMLP(nn.Module):
    """Three Linear(512, 512) + ReLU."""

    def __init__(self, width: int = 512, depth: int = 3) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *(m for _ in range(depth) for m in (nn.Linear(width, width), nn.ReLU()))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ResNetStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.blocks = nn.Sequential(*(ResidualBlock(32) for _ in range(3)))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(torch.relu(self.stem(x))).mean(dim=(2, 3)))


class LSTMTagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(64, 128, batch_first=True)
        self.head = nn.Linear(128, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out)


class Spectral(nn.Module):
    """Linear features, their FFT magnitude, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(256, 512)
        self.head = nn.Linear(257, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.fft.rfft(torch.relu(self.proj(x)), dim=-1).abs())


class WithCustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(256, 1024)
        self.b = nn.Linear(1024, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(soft_clip(self.a(x)))


class HiddenStates(nn.Module):
    """A transformers encoder called with input_ids, returning the last hidden state."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids).last_hidden_state


def _bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=1000,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=128,
    )
    return HiddenStates(BertModel(config))


def _gpt2():
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(
        vocab_size=1000,
        n_embd=256,
        n_layer=4,
        n_head=4,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
    )
    return HiddenStates(GPT2Model(config))


def _with_random_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 1000, (batch, seq))


SUITE: dict[str, Callable[[], tuple[nn.Module, tuple]]] = {
    "mlp": lambda: (DeepMLP(), (torch.randn(32, 512),)),
    "convnet": lambda: (_with_random_bn(ConvBnRelu()), (torch.randn(1, 3, 64, 64),)),
    "resnet_stack": lambda: (_with_random_bn(ResNetStack()), (torch.randn(4, 3, 32, 32),)),
    "transformer_block": lambda: (TransformerBlock(256, 8), (torch.randn(4, 128, 256),)),
    "bert": lambda: (_bert(), (_ids(4, 64),)),
    "gpt2": lambda: (_gpt2(), (_ids(4, 64),)),
    "lstm": lambda: (LSTMTagger(), (torch.randn(8, 50, 64),)),
    "fft": lambda: (Spectral(), (torch.randn(64, 256),)),
    "custom_op": lambda: (WithCustomOp(), (torch.randn(64, 256),)),
}


def make(name: str) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    model, inputs = SUITE[name]()
    return model.eval(), inputs
