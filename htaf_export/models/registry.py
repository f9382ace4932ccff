"""Registry of reference architectures, so a checkpoint can name its architecture instead of pickling code."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

_REGISTRY: dict[str, type[nn.Module]] = {}


class UnknownArchitecture(KeyError):
    pass


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is already registered")
        cls.arch = name  # type: ignore[attr-defined]
        _REGISTRY[name] = cls
        return cls

    return add


def architectures() -> list[str]:
    return sorted(_REGISTRY)


def build(arch: str, config: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate a registered architecture; ``config`` holds its constructor arguments."""
    if arch not in _REGISTRY:
        raise UnknownArchitecture(f"unknown architecture {arch!r}; registered: {', '.join(architectures())}")
    return _REGISTRY[arch](**(config or {}))


class ReferenceModel(nn.Module):
    """Base of the registered models: records its constructor arguments and declares its family.

    ``family`` is one of bnn, dhn, snn, icbm; ``input_shape`` excludes the batch dimension;
    ``output_names`` names each output of ``forward`` in order.
    """

    family: str = ""
    output_names: tuple[str, ...] = ("logits",)

    def __init__(self, config: dict[str, Any], input_shape: list[int]) -> None:
        super().__init__()
        self.config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
        self.input_shape = list(input_shape)
