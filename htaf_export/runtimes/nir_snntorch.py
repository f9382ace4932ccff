"""``snntorch``: snnTorch's own NIR importer (``snntorch.import_nir.import_from_nir``) as a validation backend, the
consumer whose equations match the file exactly: it steps a LIF as mem ← β·mem + I with β = 1 − dt/τ at the same
dt = 1e-4 this project writes, fires where mem − v_thr > 0 and resets to zero (docs/nir.md). It loads Affine,
Linear, Conv2d, Flatten, AvgPool2d, IF, LIF and CubaLIF nodes with one threshold per layer; any other file is
reported as not run, with the reason.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

from . import ArtifactInfo
from .nir_file import NirRunner

NAME = "snntorch"
LOADS = ("Input", "Output", "Affine", "Linear", "Conv2d", "Flatten", "AvgPool2d", "LIF")


def why_not(graph) -> str | None:
    """Why snnTorch's importer cannot run this graph as written, or None when it can."""
    try:
        import snntorch  # noqa: F401
    except ImportError:
        return "snnTorch is not installed: pip install 'htaf-export[nir]'"
    kinds = sorted({type(n).__name__ for n in graph.nodes.values()} - set(LOADS))
    if kinds:
        return f"snnTorch's importer has no module for NIR {', '.join(kinds)}"
    if sum(type(n).__name__ == "Output" for n in graph.nodes.values()) != 1:
        return "snnTorch's imported graph returns one output; this file has several"
    for name, node in graph.nodes.items():
        if type(node).__name__ == "LIF":
            if np.unique(node.v_threshold).size != 1:
                return f"snnTorch needs one threshold per LIF layer; {name} has several"
            if np.any(node.v_threshold < 0):
                return f"snnTorch's zero reset misbehaves below a threshold of 0 ({name})"
    return None


class SnnTorchRunner(NirRunner):
    name = NAME

    def __init__(self, info: ArtifactInfo) -> None:
        import torch
        import snntorch as snn
        from snntorch.import_nir import import_from_nir

        super().__init__(info)
        graph = self.graph
        with contextlib.redirect_stdout(io.StringIO()):  # the importer prints its progress
            self.net = import_from_nir(graph)
        self.output = next(n for n, node in graph.nodes.items() if type(node).__name__ == "Output")
        for module in self.net.modules():
            if isinstance(module, torch.nn.Flatten):  # NIR counts dimensions without the batch axis
                module.start_dim += 1
                module.end_dim += 1 if module.end_dim >= 0 else 0
        self.leaky = {name: m for name, m in self.net.named_modules() if isinstance(m, snn.Leaky)}
        self.spikes: dict[str, np.ndarray] = {}
        for name, module in self.leaky.items():
            module.register_forward_hook(self._recorder(name))

    def _recorder(self, name: str):
        def record(_module, _inputs, output) -> None:
            spikes = output[0] if isinstance(output, tuple) else output
            self.spikes[name] = spikes.detach().numpy().copy()
        return record

    def _reset(self) -> None:
        for module in self.leaky.values():
            module.reset_mem()

    def _step(self, feed: dict[str, np.ndarray]):
        import torch

        self.spikes = {}
        with torch.no_grad():
            result = self.net(*(torch.from_numpy(feed[n]) for n in self.info.input_names))
        out = result[0] if isinstance(result, tuple) else result
        return {self.output: out.detach().numpy()}, dict(self.spikes)
