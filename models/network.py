"""The networks Stratum trains and serves, and the one part of any network the speed layer needs.

The built-in network, :class:`MLP`, is a multilayer perceptron whose default shape,
30-500-1000-500-2 with dropout 0.4, is the one of the CERN Kafka/Spark high-energy-physics
pipeline; every size is configurable because a small machine must be able to bootstrap a model
in seconds. Its outputs are logits (classification) or the predicted value (regression).

A user's own network comes from a *factory*, a function named ``package.module:function`` in an
installed module, called as ``factory(n_features, n_outputs, **params)`` and returning an
``nn.Module`` that maps a ``(n, n_features)`` float32 batch to ``(n, n_outputs)``
(docs/contract.md, "Your own network"). A manifest records the factory and its parameters, and
a loader rebuilds the module from them and loads its ``state_dict``; nothing is ever unpickled.

:func:`output_layer` finds the linear layer that computes a network's outputs, checked on a
probe batch, so the speed layer can refit it on any network that ends in one.
"""
from __future__ import annotations

import importlib
import re
from typing import Any, Callable, Collection, Mapping, Sequence

import torch
from torch import nn

from models.errors import ModelError

__all__ = ["MLP", "DEFAULT_HIDDEN", "DEFAULT_DROPOUT", "MLP_FACTORY", "build_network",
           "load_factory", "output_layer", "with_output_layer"]

#: Hidden layer sizes of the CERN HEP pipeline's classifier.
DEFAULT_HIDDEN: tuple[int, ...] = (500, 1000, 500)
#: Dropout probability after every hidden layer.
DEFAULT_DROPOUT = 0.4
#: The built-in network's name where a factory is expected.
MLP_FACTORY = "mlp"

_FACTORY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


class MLP(nn.Module):
    """``Linear -> ReLU -> Dropout`` blocks followed by a linear output layer.

    Parameters
    ----------
    n_features : int
        Input width (number of preprocessed features).
    n_outputs : int
        Output width: one logit per class (at least 2), or 1 for a regression.
    hidden : sequence of int
        Sizes of the hidden layers, input side first; may be empty (a linear model).
    dropout : float
        Dropout probability after each hidden activation, in ``[0, 1)``.
    """

    def __init__(self, n_features: int, n_outputs: int,
                 hidden: Sequence[int] = DEFAULT_HIDDEN, dropout: float = DEFAULT_DROPOUT
                 ) -> None:
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        if n_features < 1:
            raise ModelError(f"n_features must be >= 1, got {n_features}")
        if n_outputs < 1:
            raise ModelError(f"n_outputs must be >= 1, got {n_outputs}")
        if any(h < 1 for h in hidden):
            raise ModelError(f"hidden sizes must be >= 1, got {list(hidden)}")
        if not 0.0 <= dropout < 1.0:
            raise ModelError(f"dropout must be in [0, 1), got {dropout}")
        self.n_features = int(n_features)
        self.n_outputs = int(n_outputs)
        self.hidden = hidden
        self.dropout = float(dropout)
        layers: list[nn.Module] = []
        width = self.n_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(self.dropout)]
            width = size
        layers.append(nn.Linear(width, self.n_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs of shape ``(n, n_outputs)`` for a ``(n, n_features)`` float32 batch."""
        out: torch.Tensor = self.net(x)
        return out

    def architecture(self) -> dict[str, Any]:
        """JSON-ready description from which :func:`build_network` rebuilds the module."""
        return {"type": "mlp", "n_features": self.n_features, "n_outputs": self.n_outputs,
                "hidden": list(self.hidden), "dropout": self.dropout}


def load_factory(name: str) -> Callable[..., nn.Module]:
    """The function ``package.module:function`` names, imported.

    Raises
    ------
    ModelError
        The name is malformed, the module cannot be imported or has no such function.
    """
    if not _FACTORY_RE.match(name):
        raise ModelError(f"model factory {name!r} is not of the form package.module:function")
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelError(f"model factory {name!r}: cannot import {module_name!r} "
                         f"({type(exc).__name__}: {exc})") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ModelError(f"model factory {name!r}: {module_name!r} has no function "
                         f"{attribute!r}")
    built: Callable[..., nn.Module] = factory
    return built


def build_network(architecture: Mapping[str, Any],
                  allowed_factories: Collection[str] = ()) -> nn.Module:
    """An untrained network from a manifest's ``architecture`` object.

    Parameters
    ----------
    architecture : mapping
        ``{"type": "mlp", ...}`` (:meth:`MLP.architecture`) or ``{"type": "factory",
        "factory": "package.module:function", "n_features", "n_outputs", "params": {...}}``.
    allowed_factories : collection of str
        The factories this process may call: a manifest names code to run, so a loader calls
        only the factories it was configured with (``MODEL_FACTORIES``, ``BATCH_MODEL``).

    Raises
    ------
    ModelError
        Unknown type, a factory not allowed or failing, or a module of the wrong kind.
    """
    kind = architecture.get("type")
    try:
        n_features, n_outputs = int(architecture["n_features"]), int(architecture["n_outputs"])
        if kind == "mlp":
            return MLP(n_features, n_outputs, hidden=[int(h) for h in architecture["hidden"]],
                       dropout=float(architecture["dropout"]))
        if kind != "factory":
            raise ModelError(f"unsupported architecture type {kind!r}")
        name = str(architecture["factory"])
        params = dict(architecture.get("params") or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"bad architecture {dict(architecture)!r}: {exc}") from None
    if name not in allowed_factories:
        raise ModelError(f"model factory {name!r} is not allowed here: list it in "
                         "MODEL_FACTORIES (serving) or name it in BATCH_MODEL (batch)")
    factory = load_factory(name)
    try:
        module = factory(n_features, n_outputs, **params)
    except Exception as exc:
        raise ModelError(f"model factory {name!r} failed with {params!r}: "
                         f"{type(exc).__name__}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise ModelError(f"model factory {name!r} returned {type(module).__name__}, "
                         "not a torch.nn.Module")
    return module


def output_layer(module: nn.Module, n_features: int) -> tuple[str, nn.Linear]:
    """The linear layer that computes ``module``'s outputs, and its name in the module.

    It is the last ``nn.Linear`` registered; a probe batch checks that the module's output is
    exactly that layer's output (so nothing, such as an activation, comes after it).

    Raises
    ------
    ModelError
        The network does not end in a linear layer.
    """
    linears = [(name, layer) for name, layer in module.named_modules()
               if isinstance(layer, nn.Linear)]
    if not linears:
        raise ModelError(f"{type(module).__name__} has no linear layer whose weights an "
                         "update could replace")
    name, layer = linears[-1]
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        was_training = module.training
        module.eval()
        with torch.inference_mode():
            probe = torch.linspace(-1.0, 1.0, 4 * n_features).reshape(4, n_features)
            result = module(probe)
        module.train(was_training)
    finally:
        handle.remove()
    if len(seen) != 1 or not isinstance(result, torch.Tensor) or result.shape != seen[0].shape \
            or not torch.equal(result, seen[0]):
        raise ModelError(f"{type(module).__name__} does not end in a linear layer (its output is "
                         f"not that of its last nn.Linear, {name!r}): the speed layer can only "
                         "update a network whose last layer is linear")
    return name, layer


def with_output_layer(module: nn.Module, name: str, layer: nn.Linear) -> nn.Module:
    """A shallow copy of ``module`` whose submodule ``name`` is ``layer``.

    Every other submodule, and so every other weight, is shared with ``module``, which is left
    untouched (it may be serving in another thread).
    """
    *path, leaf = name.split(".")

    def copy_along(node: nn.Module, rest: list[str]) -> nn.Module:
        clone = node.__new__(type(node))
        clone.__dict__ = dict(node.__dict__)
        clone._modules = dict(node._modules)
        if rest:
            child = node._modules[rest[0]]
            assert child is not None
            clone._modules[rest[0]] = copy_along(child, rest[1:])
        else:
            clone._modules[leaf] = layer
        return clone

    return copy_along(module, path)
