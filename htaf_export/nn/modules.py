"""Two facts about a module tree that every stage asks: put it in inference mode, and where its steps are."""

from __future__ import annotations

from torch import nn

from .htaf import Step


def set_eval(module: nn.Module) -> nn.Module:
    """Put ``module`` in inference mode. Graph modules from torch.export refuse ``eval()``; they are
    already traced in inference mode, so they are returned as they are."""
    try:
        module.eval()
    except NotImplementedError:
        pass
    return module


def step_modules(model: nn.Module) -> dict[str, Step]:
    """The exact steps of a (hardened) module tree by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Step)}
