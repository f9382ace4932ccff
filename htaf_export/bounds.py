"""How far two correct float32 implementations of the hardened model can be apart, element by element.

The hardened model is traced (torch.export) and interpreted once more, each tensor carrying its
float32 value and a bound e on |x̂ − v|, v the exact real-arithmetic value, for *any* float32
evaluation x̂ of it: any summation order, with or without fused multiply-adds, a batch norm folded or
not. With u = 2⁻²⁴ and γₙ the relative bound of an n-term sum — n·u/(1 − n·u) for n ≤ 16, Higham and Mary's
probabilistic λ√n·u (λ = 7) for longer sums (SIAM J. Sci. Comput. 41(5), 2019):

    dot product, n terms     e = c + γₙ₊₁ · (Σ|w|·(|x| + e_x) + |b|)           (0 when every term and
                                                                                partial sum is an exact
                                                                                integer: a binary layer)
                             c = min(Σ|w|·e_x, λ·√(Σ w²·e_x²))  the incoming errors, carried
    batch norm (eval)        e = |s|·e_x + γ₆ · (|s|·(|x| + e_x + |μ|) + |β|),  s = γ/√(var + ε)
    x ± y, x·c, x/c          e = e_x + e_y + u·|result|   (x·c: |c|·e_x + u·|result|)
    ReLU, max, pad, views    e passes through (1-Lipschitz, or a permutation)
    mean over k              e = mean(e) + γₖ₊₁ · mean(|x| + e)
    sigmoid / tanh           e = e_x / 4 (or e_x) + γ₄·|result|
    bilinear resizing        e = up(e_x) + (4Λ + γ₈)·up(3×3 max of |x| + e_x),  Λ = 4u·(size + 1)
    a @ c, both computed     e = |a|·e_c + e_a·|c| + 3·e_a·e_c + γₙ₊₁·(|a| + e_a)·(|c| + e_c)
    softmax                  e = y·(e^{2·max e_x} − 1 + u·|x − max| + γₙ₊₄)
    every rounded operation  + η = 2⁻¹²⁶ per rounding (a subnormal result, or one flushed to zero)
    exact step               the output is exact; the step's *input* bound is recorded (+ η where the
                             input is subnormal: a runtime may read it as zero)

Two implementations each within e of v are within 2e of each other, so validation explains a flipped
step bit only where |u_reference| ≤ 2·e(u), and passes a float output only where
|reference − artifact| ≤ 2·e. The bounds are worst cases (rounding errors rarely add up), yet tight
where it matters: binary layers sum exactly, so a threshold moved by one integer step, a flipped weight
bit or a batch-norm statistic off by 1e-3 all stand far outside them. An operation without a rule
here ends the analysis (``NoBound``), and validation falls back to the fixed tolerances, saying so.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.utils import _pytree as pytree

from .nn import Step
from .bounded import ETA, LAMBDA, SLACK, U, Bounded, NoBound, gamma, is_integral
from .rounding_rules import RULES, value_of

__all__ = ["U", "ETA", "SLACK", "LAMBDA", "gamma", "Bounded", "NoBound", "rounding_bounds", "batch_bounds",
           "traced_program", "interpret", "Interpretation"]
aten = torch.ops.aten


def _lift(value: Any) -> Any:
    return Bounded(value.float(), torch.zeros_like(value, dtype=torch.float32)) \
        if isinstance(value, torch.Tensor) and value.is_floating_point() else value


# A program's weights and constants, lifted once (their integrality checked once), not once per chunk.
_CONSTANTS: "weakref.WeakKeyDictionary[fx.GraphModule, dict[str, Any]]" = weakref.WeakKeyDictionary()


def _constant(program: fx.GraphModule, target: str) -> Any:
    cache = _CONSTANTS.setdefault(program, {})
    raw = getattr_path(program, target)
    # a weight edited in place (a user's own experiment) bumps its version: lift it again
    key = (target, id(raw), getattr(raw, "_version", 0))
    if key not in cache:
        lifted = _lift(raw)
        if isinstance(lifted, Bounded):
            lifted.integer = is_integral(lifted.value)
        cache[key] = lifted
    return cache[key]


@dataclass
class Interpretation:
    """One bounded evaluation: the flat outputs, and each step call's bounded input, output bits and module."""

    leaves: list[Bounded]
    steps: dict[tuple[str, int], tuple[Bounded, torch.Tensor, Step]]

    def step_bound(self, key: tuple[str, int]) -> torch.Tensor:
        """The bound of a step call's pre-activation: a runtime that treats subnormal inputs as zero (DAZ, as
        LCE's quantizer does) puts them on the tie, whatever their sign: they are a rounding, not a wrong rule."""
        x = self.steps[key][0]
        subnormal = (x.value != 0) & (x.value.abs() < 2.0 ** -126)
        return SLACK * (x.error + ETA * subnormal)


@torch.no_grad()
def interpret(program: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> Interpretation:
    """Evaluate a graph module whose steps are ``Step`` calls (``harden_traced``), every float tensor bounded."""
    env: dict[fx.Node, Any] = {}
    steps: dict[tuple[str, int], tuple[Bounded, torch.Tensor, Step]] = {}
    calls: dict[str, int] = {}
    placeholders = iter(inputs)
    out: Any = None
    for node in program.graph.nodes:
        if node.op == "placeholder":
            env[node] = _lift(next(placeholders))
        elif node.op == "get_attr":
            env[node] = _constant(program, str(node.target))
        elif node.op == "call_module":
            module = program.get_submodule(str(node.target))
            x = env[node.args[0]] if node.args else None
            if isinstance(module, Step) and isinstance(x, Bounded):
                k = calls.get(str(node.target), 0)
                calls[str(node.target)] = k + 1
                y = module(x.value)
                steps[(str(node.target), k)] = (x, y, module)
                env[node] = Bounded.exact(y, 1.0)
            else:
                env[node] = None  # the guards of an exported program
        elif node.op == "call_function":
            env[node] = _call(node, env)
        elif node.op == "output":
            out = pytree.tree_map(lambda n: env[n] if isinstance(n, fx.Node) else n, node.args[0])
    leaves = [b if isinstance(b, Bounded) else Bounded(b, torch.zeros(b.shape))  # a decision (bool): exact
              for b in pytree.tree_leaves(out, is_leaf=lambda a: isinstance(a, Bounded))
              if isinstance(b, (Bounded, torch.Tensor))]
    return Interpretation(leaves, steps)


def rounding_bounds(program: fx.GraphModule, inputs: tuple[torch.Tensor, ...]
                    ) -> tuple[list[torch.Tensor], dict[tuple[str, int], torch.Tensor]]:
    """(bound of each flat output, bound of each step call's pre-activation by (site, call)) for ``inputs``,
    on a graph module whose steps are ``Step`` calls (``harden_traced``)."""
    it = interpret(program, inputs)
    return [SLACK * b.error for b in it.leaves], {key: it.step_bound(key) for key in it.steps}


CHUNK = 32  # rows per interpreted pass: small chunks stay in cache (a third faster per row than 128)


def batch_bounds(program: fx.GraphModule, inputs: tuple[torch.Tensor, ...], output_names: list[str], chunk: int = CHUNK
                 ) -> tuple[dict[str, np.ndarray], dict[tuple[str, int], np.ndarray]]:
    """``rounding_bounds`` of a batch as arrays by output name and by step call, ``chunk`` rows at a time
    (``CHUNK``)."""
    outs: dict[str, list[np.ndarray]] = {name: [] for name in output_names}
    steps: dict[tuple[str, int], list[np.ndarray]] = {}
    for start in range(0, len(inputs[0]), chunk):
        leaves, found = rounding_bounds(program, tuple(x[start:start + chunk] for x in inputs))
        for name, bound in zip(output_names, leaves):
            outs[name].append(bound.numpy())
        for key, bound in found.items():
            steps.setdefault(key, []).append(bound.numpy())
    return ({k: np.concatenate(v) for k, v in outs.items() if v}, {k: np.concatenate(v) for k, v in steps.items()})


def _call(node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    if node.target is aten._assert_tensor_metadata.default:
        return None
    if node.target is aten.sym_size.int:
        return value_of(env[node.args[0]]).shape[node.args[1]]
    args, kwargs = pytree.tree_map(lambda n: env[n] if isinstance(n, fx.Node) else n, (node.args, node.kwargs))
    rule = RULES.get(node.target)
    if rule is not None:
        return rule(*args, **kwargs)
    rule = RULES.get(_functional(node.target))
    if rule is not None and node.args and isinstance(node.args[0], fx.Node):
        # an in-place op (``Hardtanh(inplace=True)``, ``out += b``): later readers of its input see the result;
        # on a view, or on a tensor a view was taken of, other nodes would keep the old values: no bound then
        if _aliased(node.args[0]):
            raise NoBound(f"{node.target} on a view of another tensor")
        env[node.args[0]] = result = rule(*args, **kwargs)
        return result
    if not any(isinstance(a, Bounded) for a in pytree.tree_leaves((args, kwargs))):
        values = pytree.tree_map(value_of, (args, kwargs))  # constants and shapes (zeros, sizes): exact
        return _lift(node.target(*values[0], **values[1]))
    raise NoBound(f"no rounding rule for {node.target}")


def _aliased(node: fx.Node) -> bool:
    """Whether ``node`` is a view of another tensor, or another tensor is a view of it."""
    def is_view(n: Any) -> bool:
        schema = getattr(getattr(n, "target", None), "_schema", None)
        return schema is not None and any(a.alias_info is not None and not a.alias_info.is_write
                                          for a in schema.arguments[:1])
    return is_view(node) or any(is_view(user) for user in node.users)


def _functional(target: Any) -> Any:
    """The out-of-place twin of an in-place aten op (``aten.relu_.default`` → ``aten.relu.default``), else None."""
    if not isinstance(target, torch._ops.OpOverload) or not target._schema.name.endswith("_"):
        return None
    packet = getattr(aten, target._schema.name.split("::")[-1][:-1], None)
    return getattr(packet, target._overloadname, None) if packet is not None else None


def getattr_path(module: torch.nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def traced_program(model: torch.nn.Module, input_shapes: list[list[int]]) -> fx.GraphModule | None:
    """The hardened model as a graph module whose steps are ``Step`` calls (what ``rounding_bounds`` reads);
    None for a model torch.export cannot trace (a TorchScript module is read through ``torchscript_fx``)."""
    from .harden_traced import export_batched, harden_graph_module
    from .torchscript_fx import script_as_fx

    if isinstance(model, fx.GraphModule):
        return model
    if isinstance(model, torch.jit.ScriptModule):
        converted = script_as_fx(model, input_shapes)
        program = export_batched(converted, input_shapes) if converted is not None else None
    else:
        program = export_batched(model, input_shapes)
    # the model is hardened: its steps are Step modules, or comparisons that keep their own tie
    return harden_graph_module(program, None)[0] if program is not None else None
