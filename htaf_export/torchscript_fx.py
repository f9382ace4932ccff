"""A TorchScript module as a torch.export graph module, through torch's own TorchScript-to-fx converter, so that
the rounding bounds (``bounds``), which read fx graphs of aten ops, cover TorchScript files too."""

from __future__ import annotations

import warnings

import torch
from torch import fx


def script_as_fx(model: torch.jit.ScriptModule, input_shapes: list[list[int]]) -> fx.GraphModule | None:
    """``model``'s graph as an fx graph module of aten ops (batch left free where its code allows); None when the
    converter cannot read it."""
    from torch._export import converter

    examples = tuple(torch.zeros(2, *shape) for shape in input_shapes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the converter's own entry point re-exports with every dimension fixed to the example's: its fx
            # graph, before that, keeps the batch free for export_batched
            whole = converter.TS2EPConverter(model, examples)
            lifted, fqn = converter.get_block_to_lifted_attrs(whole.ts_graph)
            graph = converter.TS2FXGraphConverter(whole.ts_graph, whole.name_to_param, whole.name_to_buffer, lifted,
                                                  whole.name_to_non_tensor_attributes, whole.name_to_constant, fqn)
            module = graph.convert()
            converter.replace_quantized_ops_with_standard_ops(module)
    except Exception:  # noqa: BLE001 - any op the converter lacks: the model is then checked with fixed tolerances
        return None
    return module
