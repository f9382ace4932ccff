"""--workers N: the same report from N processes as from one, for a pickled model and for a .pt2 (which
does not pickle, so each worker loads and hardens the file again); a broken worker reaches the user as
one line, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from htaf_export import cli
from htaf_export.nn import HTAF

from shard_reports import counts, validate_cli

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


class Keyword(nn.Module):
    """A user's own model, saved with torch.export: 1-D convs, a smooth step, a float head."""

    def __init__(self) -> None:
        super().__init__()
        self.front = nn.Conv1d(6, 16, 3)
        self.norm = nn.BatchNorm1d(16)
        self.fire = HTAF(levels="pm1")
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.pool(self.fire(self.norm(self.front(x)))).flatten(1))


@pytest.mark.slow
def test_two_workers_give_the_same_report_as_one(tmp_path, capsys):
    model = SAMPLES / "bnn_cnn.pt"
    artifact = tmp_path / "bnn_cnn.onnx"
    assert cli.main([str(model), "--target", "onnx", "-o", str(artifact), "--no-validate"]) == 0
    rc1, one = validate_cli(capsys, model, artifact, tmp_path / "one.json")
    rc2, two = validate_cli(capsys, model, artifact, tmp_path / "two.json", "--workers", "2")
    assert rc1 == rc2 == 0
    assert counts(one) == counts(two)
    assert one["backends"][0]["samples"] == two["backends"][0]["samples"] > 0


@pytest.mark.slow
def test_workers_reload_a_pt2_and_still_catch_a_wrong_artifact(tmp_path, capsys):
    torch.manual_seed(3)
    model = Keyword().eval()
    path = tmp_path / "kws.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 6, 20),)), path)
    artifact = tmp_path / "kws.onnx"
    assert cli.main([str(path), "--target", "onnx", "-o", str(artifact), "--input-shape", "6,20", "--no-validate"]) == 0
    rc1, one = validate_cli(capsys, path, artifact, tmp_path / "one.json", "--input-shape", "6,20")
    rc2, two = validate_cli(capsys, path, artifact, tmp_path / "two.json", "--input-shape", "6,20", "--workers", "2")
    assert rc1 == rc2 == 0 and counts(one) == counts(two)
    # the same check, against a model whose head differs: both must fail, in the same place
    with torch.no_grad():
        model.head.bias += 0.5
    other = tmp_path / "other.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 6, 20),)), other)
    rc1, one = validate_cli(capsys, other, artifact, tmp_path / "bad1.json", "--input-shape", "6,20")
    rc2, two = validate_cli(capsys, other, artifact, tmp_path / "bad2.json", "--input-shape", "6,20", "--workers", "2")
    assert rc1 == rc2 == 1
    assert one["first_failure"] == two["first_failure"] and one["first_failure"]["tensor"] is not None


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_workers_must_be_a_positive_count(tmp_path, capsys, value):
    rc = cli.main(["validate", str(SAMPLES / "bnn_mlp.pt"), str(tmp_path / "x.onnx"), "--workers", value])
    err = capsys.readouterr().err
    assert rc == 2 and "--workers" in err and len(err.strip().splitlines()) == 1


def test_a_failing_worker_reaches_the_caller_as_its_error(tmp_path, capsys):
    """A worker that cannot rebuild the model (its file is gone) fails the validation with that error."""
    from htaf_export.data import digits
    from htaf_export.errors import BadInput
    from htaf_export.harden import harden
    from htaf_export.io import load
    from htaf_export.runtimes import backends_for, read_artifact
    from htaf_export.validate import validate
    from htaf_export.workers import ModelRecipe, ProcessPool

    model = SAMPLES / "bnn_mlp.pt"
    artifact = tmp_path / "bnn_mlp.onnx"
    assert cli.main([str(model), "--target", "onnx", "-o", str(artifact), "--no-validate"]) == 0
    capsys.readouterr()
    info = read_artifact(artifact)
    hardening = harden(load(model).module)
    runners, _ = backends_for(info, "cpu")
    gone = ModelRecipe(path=str(tmp_path / "moved_away.pt"))
    with ProcessPool(gone, artifact, "cpu", 2) as pool, pytest.raises(BadInput, match="moved_away.pt"):
        validate(hardening.model, info, runners, digits("test", [64]), pool=pool)
