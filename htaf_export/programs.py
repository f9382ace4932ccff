"""What a saved torch.export program needs before it can stand for the trained model: exported in eval mode,
and runnable at any batch size (a program exported without a dynamic batch dimension is freed of its guard,
then checked sample by sample)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import outputs
from .errors import BadInput
from .harden_traced import constant_nodes, scope_of


TRAINING_OPS = {"batch_norm": 5, "dropout": 2, "_native_batch_norm_legit_functional": None,
                "_native_batch_norm_legit": None}  # op → position of its ``training`` flag (None: always training)


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.text: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.text.append(record.getMessage() + "\n" + (logging.Formatter().formatException(record.exc_info)
                                                       if record.exc_info else ""))


def load_program(path: Path, extra_files: dict[str, str]) -> Any:
    """``torch.export.load``, its logged traceback kept off the console; a program whose output is a namedtuple
    (which torch cannot read back without that class registered) is refused for what it is."""
    logger, kept = logging.getLogger("torch.export"), _Kept()
    handlers, logger.handlers = logger.handlers, [kept]  # torch's own handler writes to stderr
    try:
        return torch.export.load(path, extra_files=extra_files)
    except RuntimeError:
        named = re.search(r"namedtuple class ([\w.]+)", "".join(kept.text))
        if named:
            raise BadInput(f".pt2 file {path} returns a namedtuple ({named.group(1)}), which torch.export.load "
                           f"cannot read back outside the code that defines it: return a tuple or a dict from "
                           f"forward, or save a pickle (torch.save) or TorchScript") from None
        raise
    finally:
        logger.handlers = handlers


def refuse_training_mode(program: Any, path: Path) -> None:
    """A program exported before ``model.eval()`` normalizes with each batch's statistics (and drops at random):
    a different function from the trained model's, which no artifact should reproduce."""
    for node in program.graph.nodes:
        name = _op_name(node)
        flag = TRAINING_OPS.get(name, -1)
        if node.op == "call_function" and flag != -1 and (flag is None or (len(node.args) > flag and node.args[flag] is True)):
            if name == "batch_norm" and len(node.args) > 3 and node.args[3] is None or "no_stats" in str(node.target):
                raise BadInput(_batch_statistics(path, scope_of(node)[0] or str(node.name)))
            what = "a dropout drops at random" if name == "dropout" else "a batch norm uses each batch's statistics"
            raise BadInput(f".pt2 file {path} was exported in training mode ({what}); call model.eval() before "
                           f"torch.export.export")


def flatten_inputs(module: Any) -> None:
    """A program module whose forward takes nested inputs (``forward(self, batch)`` reading ``batch["image"]``)
    made to take its tensors one by one, in pytree order, each named as the graph names it (``batch_image``):
    what every exporter, runtime and data file deals in."""
    codegen = module.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is None or info.in_spec is None:
        return
    names = [n.name for n in module.graph.nodes if n.op == "placeholder"]
    flat = pytree.tree_structure((tuple(range(len(names))), {}))
    if info.in_spec == flat:
        return
    codegen.pytree_info = info._replace(in_spec=flat, orig_args=names)
    module.recompile()


def static_batch(program: Any) -> int | None:
    """The batch size a program was exported for, when it was exported without a dynamic batch dimension."""
    user = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    dims = [n.meta["val"].shape[0] for n in user if "val" in n.meta and len(n.meta["val"].shape)]
    return int(dims[0]) if dims and all(isinstance(d, int) for d in dims) else None


def free_batch(module: nn.Module, path: Path, batch: int, shapes: list[list[int]]) -> None:
    """Let a program exported for one batch size run on any: drop its batch guard, then check that each
    sample's result is what it is alone (a program that folded the batch into a reshape mixes samples). Sizes
    the trace wrote as the batch literal (``torch.zeros(x.shape[0], ...)`` became ``zeros([2, ...])``) are read
    from the input instead when the program does not run otherwise."""
    graph = module.graph  # type: ignore[attr-defined]
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target) == "_guards_fn":
            graph.erase_node(node)
    kept = rebatch_state(module, batch)
    module.recompile()  # type: ignore[operator]
    if not _runs_per_sample(module, shapes) and not (_rebatch_sizes(module, batch)
                                                     and _runs_per_sample(module, shapes)):
        raise BadInput(f".pt2 file {path} was exported for batch size {batch} only and cannot run on other batch "
                       f"sizes; {_advice(kept)}")


def _runs_per_sample(module: nn.Module, shapes: list[list[int]]) -> bool:
    """Whether the module runs at batch 3 and gives each sample what it gives it alone."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, *shape, generator=gen) for shape in shapes]
    try:
        with torch.no_grad():
            together = outputs.leaves(module(*xs))
            alone = [outputs.leaves(module(*(x[i:i + 1] for x in xs))) for i in range(3)]
        # it ran at batch 3: an output without the batch on axis 0 is a layout to fix, not a fixed batch
        outputs.require_batch_first([t.shape for t in together], 3, [f"#{k}" for k in range(len(together))])
        return all(t.shape[:1] == (3,) and all(torch.allclose(t[i:i + 1], a[k], rtol=1e-4, atol=1e-5)
                                               for i, a in enumerate(alone))
                   for k, t in enumerate(together))
    except (RuntimeError, AssertionError, IndexError, ValueError):
        return False


SIZED = {"zeros": 0, "ones": 0, "full": 0, "empty": 0, "new_zeros": 1, "new_ones": 1, "new_full": 1,
         "new_empty": 1, "view": 1, "reshape": 1, "_unsafe_view": 1, "expand": 1}  # op → position of its size


def _rebatch_sizes(module: nn.Module, batch: int) -> bool:
    """Rewrite each size list whose first entry is the batch literal to read the first input's batch; whether
    any was. At batch 1 only the reshapes of tensors computed from the inputs (``h.view(1, -1)``): a 1 elsewhere
    is as likely a broadcast axis. The caller checks the result sample by sample, so a literal that was not the
    batch is refused."""
    graph = module.graph  # type: ignore[attr-defined]
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    constant = constant_nodes(graph)
    sized = [n for n in graph.nodes if n.op == "call_function" and _op_name(n) in SIZED
             and isinstance(n.args[SIZED[_op_name(n)]], (list, tuple)) and n.args[SIZED[_op_name(n)]]
             and n.args[SIZED[_op_name(n)]][0] == batch
             and (batch > 1 or (SIZED[_op_name(n)] == 1 and isinstance(n.args[0], torch.fx.Node)
                                and n.args[0] not in constant))]
    if not inputs or not sized:
        return False
    with graph.inserting_after(inputs[-1]):
        size = graph.call_function(torch.ops.aten.sym_size.int, (inputs[0], 0))
    for node in sized:
        at = SIZED[_op_name(node)]
        node.args = (*node.args[:at], [size, *node.args[at][1:]], *node.args[at + 1:])
    module.recompile()  # type: ignore[operator]
    return True


def _advice(kept: list[str]) -> str:
    if kept:  # a dynamic batch meets the batch-sized buffer in torch.export, so that advice would fail
        return (f"its buffer {kept[0]!r} holds a state of that batch, kept from a run before export; "
                f"export a freshly built model, or reset that state to zeros first")
    return ("export it with a dynamic batch dimension: torch.export.export(model, (x,), "
            "dynamic_shapes=({0: torch.export.Dim('batch')},))")


SHAPE_ONLY = {"zeros_like", "ones_like", "empty_like", "full_like"}


def rebatch_state(module: nn.Module, batch: int) -> list[str]:
    """snnTorch keeps the last batch's membrane in a buffer (``lif.mem``, ``[batch, ...]``) and resets it with
    ``zeros_like``: a program exported after a test run reads it and so runs at that batch only. A buffer of
    that batch whose values the program never reads (only its shape) is rebuilt as zeros at each call's batch
    (one read by value may be a constant table: it is kept). Returns the batch-sized non-zero buffers the program
    reads by value, which the refusal names."""
    graph = module.graph  # type: ignore[attr-defined]
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    first = inputs[0] if inputs else None
    kept = []
    for node in [n for n in graph.nodes if n.op == "get_attr"]:
        value = getattr(_owner(module, node.target), str(node.target).rsplit(".", 1)[-1], None)
        if first is None or not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch \
                or isinstance(value, nn.Parameter):
            continue
        if not all(_op_name(user) in SHAPE_ONLY for user in node.users):  # read by value: a state or a table
            if bool(value.any()):
                kept.append(str(node.target))
            continue
        with graph.inserting_after(inputs[-1]):
            size = graph.call_function(torch.ops.aten.sym_size.int, (first, 0))
        with graph.inserting_after(size):
            zeros = graph.call_function(torch.ops.aten.zeros.default, ([size, *value.shape[1:]],),
                                        {"dtype": value.dtype})
        node.replace_all_uses_with(zeros)
        graph.erase_node(node)
        if not any(n.op == "get_attr" and n.target == node.target for n in graph.nodes):
            delattr(_owner(module, node.target), str(node.target).rsplit(".", 1)[-1])  # a non-leaf one stops deepcopy
    return kept


def _owner(module: nn.Module, target: Any) -> nn.Module:
    return module.get_submodule(str(target).rpartition(".")[0])


def _op_name(node: Any) -> str:
    return getattr(getattr(node.target, "_overloadpacket", None), "__name__", "")


def _batch_statistics(path: Path, name: str) -> str:
    return (f"{path}: batch norm {name!r} keeps no running statistics (track_running_stats=False), so even in eval it "
            f"normalizes each batch by that batch's own mean and variance: a sample's output depends on the rest of "
            f"its batch, which no exported file reproduces; train it with running statistics (the default), or use "
            f"LayerNorm or GroupNorm, which normalize each sample alone")


def refuse_batch_statistics(module: Any, path: Path) -> None:
    """A batch norm without running statistics normalizes with each batch's statistics in eval too (refused, as a
    program exported in training mode is): in a pickle, a checkpoint's model or a TorchScript module."""
    for name, sub in module.named_modules():
        kind = getattr(sub, "original_name", type(sub).__name__)
        if kind in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d") and getattr(sub, "running_mean", None) is None:
            raise BadInput(_batch_statistics(path, name))
