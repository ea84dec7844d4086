"""The delegate registry: explicit, duplicate-checked, with errors that list known ids."""

from __future__ import annotations

import pytest

import nativert
from nativert.backend.delegates.eager import EagerDelegate


class Renamed(EagerDelegate):
    backend_id = "eager_copy"


class Unavailable(EagerDelegate):
    backend_id = "never_here"

    def is_available(self):
        return nativert.Availability(False, "its runtime library is not installed")


def test_builtin_eager_is_registered_and_available():
    assert "eager" in nativert.list_delegates()
    assert "eager" in nativert.list_delegates(available_only=True)
    assert nativert.get_delegate("eager").is_available()


def test_register_and_list(registered):
    registered(Renamed())
    assert nativert.list_delegates()[-1] == "eager_copy"
    assert isinstance(nativert.get_delegate("eager_copy"), Renamed)


def test_duplicate_registration_is_an_error(registered):
    registered(Renamed())
    with pytest.raises(nativert.NativertError, match="'eager_copy' is already registered"):
        nativert.register_delegate(Renamed())


def test_non_delegate_is_rejected_with_what_it_lacks():
    with pytest.raises(nativert.NativertError, match="lacks .*preprocess"):
        nativert.register_delegate(object())


def test_unknown_id_lists_known_ones():
    with pytest.raises(
        nativert.UnknownDelegateError, match=r"'missing'.*registered delegates: .*eager"
    ):
        nativert.get_delegate("missing")


def test_unavailable_delegate_is_skipped_by_default_and_explained_when_asked(registered):
    import torch

    from tests.models import make

    registered(Unavailable())
    assert "never_here" not in nativert.list_delegates(available_only=True)
    model, inputs = make("mlp")
    program = torch.export.export(model, inputs)
    delegated = nativert.to_backend(program)  # default: available delegates only
    assert {m.backend_id for m in nativert.lowered_modules(delegated)} == {"onnxruntime"}
    with pytest.raises(nativert.DelegateUnavailableError, match="runtime library is not installed"):
        nativert.to_backend(program, nativert.CapabilityPartitioner(["never_here"]))
