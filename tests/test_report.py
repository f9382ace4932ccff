"""Reports: JSON that follows docs/report-schema.md, a self-contained HTML page, the terminal summary."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import htaf_export
from htaf_export import cli
from htaf_export.pipeline import export
from htaf_export.report import render_html
from htaf_export.sizes import CATEGORY_BINARY, size_breakdown

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
SCHEMA_DOC = ROOT / "docs" / "report-schema.md"


def schema() -> dict:
    text = SCHEMA_DOC.read_text()
    block = re.search(r"## Machine-checkable schema.*?```json\n(.*?)```", text, re.S)
    assert block, "docs/report-schema.md must hold the JSON Schema in a ```json block"
    return json.loads(block.group(1))


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def check(value, spec: dict, path: str = "$") -> list[str]:
    """The subset of JSON Schema the schema uses: type, enum, required, properties, items, additionalProperties."""
    errors = []
    if "enum" in spec and value not in spec["enum"]:
        errors.append(f"{path}: {value!r} not in {spec['enum']}")
    if "type" in spec:
        types = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]

        def fits(t: str) -> bool:
            if t == "integer":
                return isinstance(value, int) and not isinstance(value, bool)
            if t == "number":
                return isinstance(value, (int, float)) and not isinstance(value, bool)
            return isinstance(value, _TYPES[t])

        if not any(fits(t) for t in types):
            return errors + [f"{path}: {type(value).__name__} is not {types}"]
    if isinstance(value, dict):
        for key in spec.get("required", []):
            if key not in value:
                errors.append(f"{path}: missing {key}")
        for key, sub in spec.get("properties", {}).items():
            if key in value:
                errors += check(value[key], sub, f"{path}.{key}")
        extra = spec.get("additionalProperties")
        if isinstance(extra, dict):
            for key, v in value.items():
                if key not in spec.get("properties", {}):
                    errors += check(v, extra, f"{path}.{key}")
    if isinstance(value, list) and "items" in spec:
        for i, v in enumerate(value):
            errors += check(v, spec["items"], f"{path}[{i}]")
    return errors


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """bnn_cnn: a clean export with JSON and HTML reports, and a sabotaged copy validated the same way."""
    out = tmp_path_factory.mktemp("report")
    art = out / "bnn_cnn.onnx"
    assert cli.main([str(SAMPLES / "bnn_cnn.pt"), "--target", "onnx", "-o", str(art), "--report",
                     str(out / "clean.json")]) == 0
    proto = onnx.load(str(art))
    init = next(i for i in proto.graph.initializer if i.name == "layers.conv2.weight.packed")
    packed = numpy_helper.to_array(init).copy()
    packed.reshape(-1)[0] ^= 0x01
    init.CopyFrom(numpy_helper.from_array(packed, init.name))
    bad = out / "bad.onnx"
    onnx.save(proto, str(bad))
    assert cli.main(["validate", str(SAMPLES / "bnn_cnn.pt"), str(bad), "--device", "cpu",
                     "--report", str(out / "bad.html")]) == 1
    assert cli.main(["validate", str(SAMPLES / "bnn_cnn.pt"), str(bad), "--device", "cpu",
                     "--report", str(out / "bad.json")]) == 1
    from test_user_patterns import TwoInputs  # no crafted inputs for two inputs: its "crafted" was {}

    two = htaf_export.save(TwoInputs().eval(), out / "two.pt2", input_shape=[[12], [4]])
    assert cli.main([str(two), "--target", "onnx", "-o", str(out / "two.onnx"), "--device", "cpu",
                     "--report", str(out / "two.json")]) == 0
    return out


def test_json_reports_follow_the_schema(reports):
    spec = schema()
    for name in ("clean.json", "bad.json", "two.json"):
        data = json.loads((reports / name).read_text())
        assert check(data, spec) == [], name


def test_json_report_content(reports):
    clean = json.loads((reports / "clean.json").read_text())
    assert clean["passed"] and clean["first_failure"] is None
    assert clean["export"]["target"] == "onnx" and clean["export"]["layers"]
    assert [t["name"] for t in clean["backends"][0]["tensors"]] == ["layers.act1", "layers.act2", "layers.act3",
                                                                   "logits"]
    assert clean["crafted"]["samples"] == clean["backends"][0]["crafted_samples"] > 0
    assert clean["size"]["total_bytes"] == (reports / "bnn_cnn.onnx").stat().st_size
    bad = json.loads((reports / "bad.json").read_text())
    assert not bad["passed"]
    assert bad["first_failure"]["tensor"] == "layers.act2" and bad["first_failure"]["layer"] == "layers.conv2"
    act2 = bad["backends"][0]["tensors"][1]
    assert act2["unexplained"] > 0 and act2["examples"] and not act2["passed"]
    assert bad["backends"][0]["tensors"][0]["passed"]  # act1 comes before the sabotaged layer


def test_html_report_is_self_contained_and_names_the_failing_tensor(reports):
    page = (reports / "bad.html").read_text()
    images = re.findall(r"<img [^>]*src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 3  # per-layer agreement, margin distribution, size breakdown
    for b64 in images:
        assert base64.b64decode(b64).startswith(b"\x89PNG")
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page), "nothing may load from elsewhere"
    assert "<link" not in page and "<script src" not in page
    assert "FAIL" in page and "<code>layers.act2</code>" in page and "layers.conv2" in page
    embedded = re.search(r"<script type='application/json' id='report-data'>(.*?)</script>", page, re.S)
    data = json.loads(embedded.group(1).replace("<\\/", "</"))
    assert data["first_failure"]["tensor"] == "layers.act2"


def test_html_escapes_what_it_shows(reports):
    data = json.loads((reports / "clean.json").read_text())
    data["model"] = "<script>alert(1)</script>&"
    page = render_html(data)
    assert "<script>alert(1)</script>" not in page.split("id='report-data'>")[0]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;" in page


def test_size_breakdown_reads_packed_weights_from_the_file(reports):
    size = size_breakdown(reports / "bnn_cnn.onnx")
    proto = onnx.load(str(reports / "bnn_cnn.onnx"))
    packed = sum(numpy_helper.to_array(i).nbytes for i in proto.graph.initializer if i.name.endswith(".packed"))
    assert size["by_category"][CATEGORY_BINARY] == packed
    assert sum(r["bytes"] for r in size["rows"]) == size["total_bytes"]
    layers = {r["layer"] for r in size["rows"] if r["category"] == CATEGORY_BINARY}
    assert layers == {"layers.conv1", "layers.conv2", "layers.conv3", "layers.fc_out"}


def test_terminal_summary(tmp_path, capsys):
    art = tmp_path / "dhn.onnx"
    assert cli.main([str(SAMPLES / "dhn_mlp.pt"), "--target", "onnx", "-o", str(art), "--no-validate"]) == 0
    capsys.readouterr()
    assert cli.main(["validate", str(SAMPLES / "dhn_mlp.pt"), str(art), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime-cpu" in out and "1797/1797" in out and "crafted inputs:" in out
    assert "parity passed" in out


def test_export_writes_html_report(tmp_path):
    result = export(SAMPLES / "icbm_cnn.pt", "onnx", tmp_path / "icbm.onnx", device="cpu")
    from htaf_export.report import write_report

    write_report(result.report, tmp_path / "icbm.html", result)
    page = (tmp_path / "icbm.html").read_text()
    assert "PASS" in page and "concepts" in page and page.count("data:image/png;base64,") == 3
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["icbm.html", "icbm.onnx"]
    assert np.isfinite(result.report.seconds)


def test_validation_time_is_a_ratio_only_to_a_measurable_inference_time():
    from htaf_export.report import _time_text

    assert _time_text({"seconds": 2.0, "backends": [{"inference_seconds": 0.5}, {"inference_seconds": 0.5}]}) == \
        "2 s: 2.00× the runtimes' own inference (1 s)"
    tiny = _time_text({"seconds": 2.0, "backends": [{"inference_seconds": 0.0012}]})
    assert tiny.endswith("(the runtimes' own inference: 1 ms)") and "×" not in tiny
