"""Networks: factories run only when allowed, and the output layer of any network is found."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from models.errors import ModelError
from models.network import MLP, build_network, load_factory, output_layer, with_output_layer
from models.zoo import ResidualMLP

RESIDUAL = "models.zoo:residual_mlp"


def factory_architecture(**params: object) -> dict[str, object]:
    return {"type": "factory", "factory": RESIDUAL, "n_features": 5, "n_outputs": 3,
            "params": params}


def test_a_factory_is_called_only_when_it_is_allowed() -> None:
    with pytest.raises(ModelError, match="not allowed here: list it in MODEL_FACTORIES"):
        build_network(factory_architecture())
    module = build_network(factory_architecture(width=16, blocks=1), allowed_factories=[RESIDUAL])
    assert isinstance(module, ResidualMLP)
    assert module(torch.zeros(7, 5)).shape == (7, 3)
    assert module.head.in_features == 16


@pytest.mark.parametrize("name, reason", [
    ("os.system", "not of the form package.module:function"),
    ("no_such_module_here:build", "cannot import 'no_such_module_here'"),
    ("models.zoo:no_such_function", "has no function 'no_such_function'"),
])
def test_a_bad_factory_name_is_a_clear_error(name: str, reason: str) -> None:
    with pytest.raises(ModelError, match=reason):
        load_factory(name)


def test_a_factory_that_fails_or_returns_something_else_is_refused() -> None:
    with pytest.raises(ModelError, match="failed with .*ValueError: ResidualMLP needs"):
        build_network(factory_architecture(width=0), allowed_factories=[RESIDUAL])
    with pytest.raises(ModelError, match="returned Tensor, not a torch.nn.Module"):
        build_network({"type": "factory", "factory": "torch:zeros", "n_features": 2,
                       "n_outputs": 2}, allowed_factories=["torch:zeros"])


def test_the_output_layer_is_found_in_any_network_ending_in_a_linear_layer() -> None:
    mlp = MLP(4, 2, hidden=(8,))
    assert output_layer(mlp, 4) == ("net.3", mlp.net[3])
    residual = ResidualMLP(4, 1, width=8)
    assert output_layer(residual, 4) == ("head", residual.head)


def test_a_network_that_does_not_end_in_a_linear_layer_is_refused() -> None:
    squashed = nn.Sequential(nn.Linear(4, 3), nn.Sigmoid())
    with pytest.raises(ModelError, match="does not end in a linear layer"):
        output_layer(squashed, 4)
    with pytest.raises(ModelError, match="has no linear layer"):
        output_layer(nn.Sequential(nn.Identity()), 4)


def test_replacing_the_output_layer_shares_the_rest_and_leaves_the_original_alone() -> None:
    residual = ResidualMLP(4, 2, width=8).eval()
    before = residual.head
    layer = nn.Linear(8, 2)
    copy = with_output_layer(residual, "head", layer)
    assert residual.head is before and copy.head is layer
    assert copy.project is residual.project and copy.blocks is residual.blocks
    mlp = MLP(4, 2, hidden=(8,)).eval()
    last = nn.Linear(8, 2)
    swapped = with_output_layer(mlp, "net.3", last)
    assert swapped.net[3] is last and mlp.net[3] is not last and swapped.net[0] is mlp.net[0]
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.allclose(swapped(x), last(torch.relu(mlp.net[0](x))))
