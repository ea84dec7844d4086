"""OutputBuffer: reused only when nothing a caller holds can see its memory."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from nativert.backend.runtime.buffers import OutputBuffer


@pytest.fixture
def buffer():
    return OutputBuffer((4, 8), torch.float32)


def test_a_new_buffer_is_released(buffer):
    assert buffer.released()
    assert buffer.ptr == buffer.alias().data_ptr()


def test_an_alias_is_a_fresh_plain_tensor(buffer):
    first = buffer.alias()
    first.requires_grad_()
    first.extra = "set by a caller"
    del first
    second = buffer.alias()
    assert not second.requires_grad and not hasattr(second, "extra")
    assert second._base is None, "an alias must not lead back to the buffer's own tensor"
    assert (second.shape, second.dtype) == ((4, 8), torch.float32)


@pytest.mark.parametrize(
    "hold",
    [
        lambda t: t,
        lambda t: t[1:3],
        lambda t: t.view(-1),
        lambda t: t.detach(),
        lambda t: t.numpy(),
        lambda t: np.asarray(t),
        lambda t: torch.utils.dlpack.to_dlpack(t),
        lambda t: t.untyped_storage(),
        lambda t: [t.T],
        lambda t: torch.from_numpy(t.numpy()),
    ],
    ids=[
        "tensor",
        "slice",
        "view",
        "detach",
        "numpy",
        "asarray",
        "dlpack",
        "storage",
        "in_a_list",
        "from_numpy",
    ],
)
def test_anything_holding_the_memory_keeps_the_buffer(buffer, hold):
    held = hold(buffer.alias())
    gc.collect()
    assert not buffer.released()
    del held
    gc.collect()
    assert buffer.released()


def test_storage_taken_from_an_alias_then_the_alias_dropped(buffer):
    alias = buffer.alias()
    storage = alias.untyped_storage()
    del alias
    assert not buffer.released(), "the storage object alone still sees the memory"
    del storage
    assert buffer.released()


def test_an_alias_that_moves_the_storage_frees_nothing_it_should_not(buffer):
    """A caller can swap the storage's memory (`share_memory_`): the buffer's memory is then
    not what was bound, so it must not count as released."""
    alias = buffer.alias()
    alias.share_memory_()
    del alias
    assert not buffer.released()


def test_under_inference_mode_the_buffer_is_a_normal_tensor():
    with torch.inference_mode():
        buffer = OutputBuffer((3,), torch.float32)
        alias = buffer.alias()
    assert not alias.is_inference()
    alias += 1  # in place outside inference mode: allowed for a normal tensor


def test_zero_element_buffer():
    buffer = OutputBuffer((0, 4), torch.float32)
    assert buffer.alias().shape == (0, 4)
    assert buffer.released()
