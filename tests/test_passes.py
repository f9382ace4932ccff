"""One small graph per IR rewrite rule / pass: what it rewrites, what it refuses, and (where numerics
change) bit-equal outputs in ONNX Runtime before and after, on inputs at the threshold and one float
step either side."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from htaf_export.ops import attach_step_functions, lower_steps
from htaf_export.passes import FoldBatchNormIntoSteps, PackBinaryWeights, RecognisePlainSteps

PLAIN = '<ir_version: 8, opset_import: ["" : 18]>\n'
STEPS = '<ir_version: 8, opset_import: ["" : 18, "htaf" : 1]>\n'
CMP = {"ge": "GreaterOrEqual", "gt": "Greater"}


def build(text: str, header: str = PLAIN, **inits) -> onnx.ModelProto:
    """A model from ONNX text, with numpy initializers (float32 unless given an array of another dtype)."""
    proto = onnx.parser.parse_model(header + text)
    for name, value in inits.items():
        array = value if isinstance(value, np.ndarray) else np.asarray(value, dtype=np.float32)
        proto.graph.initializer.append(numpy_helper.from_array(array, name))
    return proto


def run(proto: onnx.ModelProto, **feeds) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # folded batch norms leave unused initializers behind
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def lowered(model: ir.Model) -> onnx.ModelProto:
    return lower_steps(ir.to_proto(model))


def around(*points: float) -> np.ndarray:
    """Each point as float32 and its two float32 neighbours."""
    values = []
    for p in np.asarray(points, dtype=np.float32):
        values += [np.nextafter(p, np.float32(-np.inf)), p, np.nextafter(p, np.float32(np.inf))]
    return np.array(values, dtype=np.float32)


def ops(model: ir.Model) -> list[tuple[str, str]]:
    return [(n.domain, n.op_type) for n in model.graph]


def assert_bit_equal(before: list[np.ndarray], after: list[np.ndarray]) -> None:
    assert len(before) == len(after)
    for b, a in zip(before, after):
        assert (b.dtype, b.shape) == (a.dtype, a.shape)
        assert b.tobytes() == a.tobytes(), f"before {b.tolist()}\nafter  {a.tolist()}"


# ---- RecognisePlainSteps: rules PlainHeaviside, PlainSign ----------------------------------------


def test_plain_heaviside_ge_and_gt_become_steps_with_their_tie():
    proto = build("""g (float[N] x) => (float[N] y, float[N] z) {
        [cmp_ge] c = GreaterOrEqual(x, t)
        y = Cast<to = 1>(c)
        [cmp_gt] d = Greater(x, t)
        z = Cast<to = 1>(d)
    }""", t=0.1)
    x = around(0.1, 0.0)
    before = run(proto, x=x)
    model = ir.from_proto(proto)
    result = RecognisePlainSteps()(model)
    assert result.modified and result.refusals == ()
    steps = {n.outputs[0].name: n for n in model.graph}
    assert ops(model) == [("htaf", "Heaviside")] * 2
    assert [o.name for o in model.graph.outputs] == ["y", "z"]  # graph outputs keep their names
    assert (steps["y"].name, steps["y"].attributes["tie"].as_string()) == ("cmp_ge", "ge")
    assert (steps["z"].name, steps["z"].attributes["tie"].as_string()) == ("cmp_gt", "gt")
    after = run(lowered(model), x=x)
    assert after[0][1] == 1.0 and after[1][1] == 0.0  # x = t exactly: the two ties differ
    assert_bit_equal(before, after)


@pytest.mark.parametrize("tie", ["ge", "gt"])
@pytest.mark.parametrize("mul", ["Mul(f, two)", "Mul(two, f)"], ids=["cast_times_2", "2_times_cast"])
def test_plain_sign_is_one_step_node(tie, mul):
    proto = build(f"""g (float[N] x) => (float[N] s) {{
        [cmp] c = {CMP[tie]}(x, t)
        f = Cast<to = 1>(c)
        d = {mul}
        s = Sub(d, one)
    }}""", t=-0.3, two=2.0, one=1.0)
    x = around(-0.3, 0.0)
    before = run(proto, x=x)
    model = ir.from_proto(proto)
    assert RecognisePlainSteps()(model).modified
    assert ops(model) == [("htaf", "Sign")]
    step = next(iter(model.graph))
    assert (step.name, step.attributes["tie"].as_string()) == ("cmp", tie)
    assert step.outputs[0].name == "s" and model.graph.outputs[0] is step.outputs[0]
    after = run(lowered(model), x=x)
    assert after[0][1] == (1.0 if tie == "ge" else -1.0)
    assert_bit_equal(before, after)


def test_plain_step_with_run_time_threshold_is_refused():
    proto = build("""g (float[N] x, float t) => (float[N] y) {
        c = GreaterOrEqual(x, t)
        y = Cast<to = 1>(c)
    }""")
    model = ir.from_proto(proto)
    result = RecognisePlainSteps()(model)
    assert not result.modified and ops(model) == [("", "GreaterOrEqual"), ("", "Cast")]
    ((value, reason),) = result.refusals
    assert value == "y" and "not a constant" in reason and "run time" in reason


def test_cast_to_int64_is_not_a_step():
    proto = build("""g (float[N] x) => (int64[N] y) {
        c = GreaterOrEqual(x, t)
        y = Cast<to = 7>(c)
    }""", t=0.5)
    model = ir.from_proto(proto)
    result = RecognisePlainSteps()(model)
    assert not result.modified and result.refusals == ()
    assert ops(model) == [("", "GreaterOrEqual"), ("", "Cast")]


@pytest.mark.parametrize("dtype, two", [
    pytest.param(np.float32, 2.00001, id="mul_by_2.00001"),  # not 2·H − 1 exactly: left alone
    pytest.param(np.float64, 2.0, id="double_input"),  # a step keeps its input's type: left alone
])
def test_plain_rewrites_never_change_outputs(dtype, two):
    kind = "float" if dtype == np.float32 else "double"
    proto = build(f"""g ({kind}[N] x) => (float[N] s, float[N] y) {{
        c = GreaterOrEqual(x, t)
        f = Cast<to = 1>(c)
        d = Mul(f, two)
        s = Sub(d, one)
        c2 = GreaterOrEqual(x, t)
        y = Cast<to = 1>(c2)
    }}""", t=np.array(0.25, dtype), two=two, one=1.0)
    x = around(0.25).astype(dtype)
    before = run(proto, x=x)
    model = ir.from_proto(proto)
    RecognisePlainSteps()(model)
    assert_bit_equal(before, run(lowered(model), x=x))


# ---- FoldBatchNormIntoSteps: rule FoldBatchNorm ---------------------------------------------------

# Channels: γ > 0 (t = 0.25 + (1.5 − 0.5)·2/4 = 0.75), γ < 0 (t = −0.75), γ = 0 with b = θ, γ = 0 with b < θ.
# Powers of two and ε = 0 keep the reference batch norm exact at t and one float step either side.
BN = dict(gamma=[4.0, -2.0, 0.0, 0.0], beta=[0.5, 0.0, 1.5, 0.0], mean=[0.25, 0.0, 0.0, 0.0],
          var=[4.0, 1.0, 1.0, 1.0], theta=1.5)


def bn_graph(op: str, tie: str, inputs: str = "", extra: str = "", outputs: str = "") -> str:
    return f"""g (float[R, 4] x{inputs}) => (float[R, 4] y{outputs}) {{
        n = BatchNormalization<epsilon = 0.0>(x, gamma, beta, mean, var)
        y = htaf.{op}<tie = "{tie}">(n, theta){extra}
    }}"""


@pytest.mark.parametrize("tie", ["ge", "gt"])
@pytest.mark.parametrize("op", ["Heaviside", "Sign"])
def test_fold_batch_norm_keeps_the_tie(op, tie):
    proto = build(bn_graph(op, tie), STEPS, **BN)
    xs = around(0.75, -0.75, 0.0, 1.5)
    x = np.repeat(xs[:, None], 4, axis=1)
    before = run(attach_step_functions(onnx.ModelProto.FromString(proto.SerializeToString())), x=x)
    # the reference itself, by hand: the inputs do hit the tie in every channel
    fires = np.stack([xs >= 0.75 if tie == "ge" else xs > 0.75, xs <= -0.75 if tie == "ge" else xs < -0.75,
                      np.full(xs.shape, tie == "ge"), np.zeros(xs.shape, bool)], axis=1)
    assert np.array_equal(before[0], np.where(fires, 1.0, 0.0 if op == "Heaviside" else -1.0))

    model = ir.from_proto(proto)
    result = FoldBatchNormIntoSteps()(model)
    assert result.modified and result.refusals == ()
    assert ops(model) == [("", "Mul"), ("htaf", op)]
    mul, step = list(model.graph)
    assert mul.inputs[0].name == "x" and step.inputs[0] is mul.outputs[0]
    np.testing.assert_array_equal(mul.inputs[1].const_value.numpy().ravel(), [1.0, -1.0, 0.0, 0.0])
    assert step.attributes["tie"].as_string() == tie and step.outputs[0].name == "y"
    assert_bit_equal(before, run(lowered(model), x=x))


SHARED = {"another_node": ("\n        m = Identity(n)", ", float[R, 4] m"), "graph_output": ("", ", float[R, 4] n")}


@pytest.mark.parametrize("extra, outputs", SHARED.values(), ids=SHARED.keys())
def test_fold_batch_norm_leaves_a_shared_output(extra, outputs):
    model = ir.from_proto(build(bn_graph("Sign", "ge", extra=extra, outputs=outputs), STEPS, **BN))
    before = ops(model)
    result = FoldBatchNormIntoSteps()(model)
    assert not result.modified and ops(model) == before and ("", "BatchNormalization") in before


@pytest.mark.parametrize("extra, outputs", SHARED.values(), ids=SHARED.keys())
def test_fold_batch_norm_says_why_a_shared_output_stayed(extra, outputs):
    model = ir.from_proto(build(bn_graph("Sign", "ge", extra=extra, outputs=outputs), STEPS, **BN))
    result = FoldBatchNormIntoSteps()(model)
    assert [reason for _, reason in result.refusals] == ["the batch norm's output is used by more than its step"]


def test_fold_batch_norm_refuses_run_time_parameters():
    params = {k: v for k, v in BN.items() if k != "gamma"}
    proto = build(bn_graph("Heaviside", "gt", inputs=", float[4] gamma"), STEPS, **params)
    model = ir.from_proto(proto)
    result = FoldBatchNormIntoSteps()(model)
    assert not result.modified and ops(model) == [("", "BatchNormalization"), ("htaf", "Heaviside")]
    ((_, reason),) = result.refusals
    assert reason == "batch-norm parameters are computed at run time"


# ---- PackBinaryWeights ----------------------------------------------------------------------------

CONV = """g (float[1, 2, 5, 5] x) => (float[1, O, H, W] y) {
    y = Conv(x, w)
}"""


def pm1(shape, seed=0) -> np.ndarray:
    return np.where(np.random.default_rng(seed).random(shape) < 0.5, -1.0, 1.0).astype(np.float32)


def test_pack_binary_weights_round_trips_in_ort():
    w = pm1((5, 2, 3, 3))  # 90 weights: 12 bytes, the last one trimmed by a Slice
    proto = build(CONV, w=w)
    x = np.random.default_rng(1).standard_normal((1, 2, 5, 5)).astype(np.float32)
    before = run(proto, x=x)
    model = ir.from_proto(proto)
    result = PackBinaryWeights()(model)
    assert result.modified
    (record,) = result.records
    assert (record.layer, record.weight, record.numel, record.packed_bytes) == ("w", "w", 90, 12)
    assert "w" not in model.graph.initializers
    packed = model.graph.initializers["w.packed"].const_value.numpy()
    assert packed.dtype == np.uint8 and packed.size == 12
    conv = next(n for n in model.graph if n.op_type == "Conv")
    unpacked = conv.inputs[1]
    assert unpacked.const_value is None and unpacked.producer() is not None
    model.graph.outputs.append(unpacked)  # read the unpacker's result back
    y, weight = run(ir.to_proto(model), x=x)
    assert weight.dtype == np.float32 and weight.tobytes() == w.tobytes()
    assert_bit_equal(before, [y])


HALF = np.where(np.arange(90).reshape(5, 2, 3, 3) == 7, np.float32(0.5), pm1((5, 2, 3, 3)))  # one 0.5 among ±1


@pytest.mark.parametrize("w", [HALF, pm1((3, 2, 3, 3))], ids=["has_0.5", "tiny_54"])
def test_pack_binary_weights_skips_non_binary_and_tiny(w):
    model = ir.from_proto(build(CONV, w=w))
    result = PackBinaryWeights()(model)
    assert not result.modified and result.records == ()
    assert ops(model) == [("", "Conv")] and list(model.graph.initializers) == ["w"]
    assert next(iter(model.graph)).inputs[1].const_value is not None


# ---- FuseBinaryLayers (converters/tflite_binary.py) ----------------------------------------------

# Per channel: an exact tie at v = 0, a decreasing channel, γ = 0 (never fires), a generic one, one that
# always fires. 18 = fan-in K.
FUSE_BN = dict(gamma=[1.0, -0.5, 0.0, 3.7, 1e-3], beta=[0.0, 0.3, -1.0, 0.1, 2.0], mean=[0.0, 2.0, 0.0, -1.3, 0.0],
               var=[1.0, 4.0, 1.0, 2.5, 1.0])


@pytest.mark.parametrize("tie", ["ge", "gt"])
def test_fuse_binary_conv_integer_thresholds(tie):
    from htaf_export.converters.tflite_binary import DOMAIN, OP, FuseBinaryLayers

    w = pm1((5, 2, 3, 3), seed=2)
    proto = build(f"""g (float[1, 2, 5, 5] x) => (float[1, 5, 3, 3] y) {{
        s = htaf.Sign<tie = "{tie}">(x, zero)
        c = Conv(s, w)
        n = BatchNormalization(c, gamma, beta, mean, var)
        y = htaf.Sign<tie = "{tie}">(n, zero)
    }}""", STEPS, w=w, zero=0.0, **FUSE_BN)
    x = np.random.default_rng(3).standard_normal((1, 2, 5, 5)).astype(np.float32)
    (y_before,) = run(lowered(ir.from_proto(proto)), x=x)
    model = ir.from_proto(proto)
    result = FuseBinaryLayers(bitpacked=True)(model)
    assert result.refusals == () and len(result.records) == 1
    assert ops(model) == [("htaf", "Sign"), (DOMAIN, OP)]
    fused = list(model.graph)[1]
    assert fused.outputs[0].name == "y" and model.graph.outputs[0] is fused.outputs[0]
    layer = fused.meta["binary"]
    assert layer is result.records[0]
    assert (layer.mode, layer.fan_in, layer.levels, layer.tie, layer.step) == ("threshold", 18, "pm1", tie, "y")

    # the original batch norm + step, run by ORT on every integer pre-activation v in [-K, K]
    v = np.arange(-18, 19, dtype=np.float32)
    reference = build(f"""g (float[V, 5] v) => (float[V, 5] y) {{
        n = BatchNormalization(v, gamma, beta, mean, var)
        y = htaf.Sign<tie = "{tie}">(n, zero)
    }}""", STEPS, zero=0.0, **FUSE_BN)
    (stepped,) = run(lower_steps(reference), v=np.repeat(v[:, None], 5, axis=1))
    truth = stepped == 1.0
    assert truth[18, 0] == (tie == "ge")  # v = 0 lands exactly on θ in channel 0
    assert not truth[:, 2].any() and truth[:, 4].all()
    np.testing.assert_array_equal(layer.flip[None, :] * v[:, None] >= layer.threshold[None, :], truth)

    # the layer as LCE would run it: sign(conv(s, flip·W) + ½ − T), never 0, is the original output
    s = np.where(x >= 0 if tie == "ge" else x > 0, 1.0, -1.0)[0]
    patches = np.lib.stride_tricks.sliding_window_view(s, (3, 3), axis=(1, 2))  # [C, 3, 3, kh, kw]
    pre = np.einsum("chwij,ocij->ohw", patches, layer.folded_weight()) + layer.folded_bias()[:, None, None]
    assert np.all(pre != 0)
    np.testing.assert_array_equal(np.where(pre > 0, 1.0, -1.0)[None], y_before)


def test_fuse_refuses_binary_conv_on_real_valued_input():
    from htaf_export.converters.tflite_binary import FuseBinaryLayers

    model = ir.from_proto(build(CONV, w=pm1((5, 2, 3, 3))))
    result = FuseBinaryLayers(bitpacked=True)(model)
    assert result.records == () and not result.modified and ops(model) == [("", "Conv")]
    ((name, reason),) = result.refusals
    assert name == "w" and "real-valued" in reason


# ---- lower_steps ----------------------------------------------------------------------------------


MIXED = """g (float[N] x) => (float[N] a, float[N] b, float[N] c, float[N] d) {
        a = htaf.Heaviside<tie = "ge">(x, t)
        b = htaf.Heaviside<tie = "gt">(x, t)
        c = htaf.Sign<tie = "ge">(x, t)
        d = htaf.Sign<tie = "gt">(x, t)
    }"""


@pytest.mark.parametrize("how", ["lowered", "overloads"])
def test_mixed_ties_keep_each_nodes_rule(how):
    proto = build(MIXED, STEPS, t=0.1)
    if how == "lowered":
        runnable = lower_steps(proto)
        assert {o.domain for o in runnable.opset_import} == {""}
        assert {n.domain for n in runnable.graph.node} == {""}
    else:  # one function body per (op, tie), each node calling the overload named after its rule
        proto.ir_version = 10
        runnable = attach_step_functions(proto)
        assert sorted((f.name, f.overload) for f in runnable.functions) == [
            ("Heaviside", "ge"), ("Heaviside", "gt"), ("Sign", "ge"), ("Sign", "gt")]
        onnx.checker.check_model(runnable, full_check=True)
    a, b, c, d = run(runnable, x=around(0.1))  # below, at, above
    np.testing.assert_array_equal(a, [0.0, 1.0, 1.0])
    np.testing.assert_array_equal(b, [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(c, [-1.0, 1.0, 1.0])
    np.testing.assert_array_equal(d, [-1.0, -1.0, 1.0])
    assert {r.dtype for r in (a, b, c, d)} == {np.dtype(np.float32)}


@pytest.mark.parametrize("tie", ["ge", "gt"])
def test_folded_thresholds_fire_exactly_where_the_reference_batch_norm_does(tie):
    """Random statistics, inputs drawn around each channel's threshold and at the floats next to it: the folded
    step and PyTorch's batch norm + step agree on every one (the old closed form missed by an ulp here)."""
    import torch
    import torch.nn.functional as F

    from htaf_export.passes.bn_fold import folded_threshold

    rng = np.random.default_rng(7)
    c = 64
    gamma = rng.normal(size=c).astype(np.float32)
    gamma[:3] = [0.0, 1e-30, -1e-30]
    beta, mean = rng.normal(size=c).astype(np.float32), rng.normal(size=c).astype(np.float32)
    var = rng.uniform(0.01, 3.0, size=c).astype(np.float32)
    theta = 0.3
    s, t = folded_threshold([gamma, beta, mean, var], theta, 1e-5, tie)
    edge = np.where(s != 0, t * np.where(s == 0, 1, s), 0).astype(np.float32)
    around = edge[None, :] + rng.normal(scale=1e-3, size=(2000, c)).astype(np.float32)
    ulps = np.stack([np.nextafter(edge, np.float32(d)) for d in (-np.inf, np.inf)] + [edge])
    x = np.concatenate([around, ulps, rng.normal(scale=5, size=(2000, c)).astype(np.float32)]).astype(np.float32)
    y = F.batch_norm(torch.from_numpy(x), *(torch.from_numpy(a) for a in (mean, var, gamma, beta)), False, 0.0, 1e-5)
    reference = (y >= theta if tie == "ge" else y > theta).numpy()
    u = x * s
    folded = u >= t if tie == "ge" else u > t
    assert np.array_equal(folded, reference), int((folded != reference).sum())
