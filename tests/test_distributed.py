"""--ray ADDRESS: validation sharded over a Ray cluster (a local one, started here) gives the same report
as one process, and still fails a wrong artifact; an unreachable address is one line, exit 2."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from htaf_export import cli

from shard_reports import counts, validate_cli

ray = pytest.importorskip("ray", reason="the distributed extra is not installed")

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head on this machine, two CPUs; its files (and Ray's auth token) under a temporary HOME."""
    home = tmp_path_factory.mktemp("rayhome")
    env = {**os.environ, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    port = _free_port()
    temp = Path("/tmp") / f"htaf_ray_{port}"  # Ray's socket paths must stay short
    started = subprocess.run([*ray_cli, "start", "--head", "--num-cpus", "2", "--include-dashboard=false",
                              "--port", str(port), "--temp-dir", str(temp), "--disable-usage-stats"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr[-2000:]
    saved = os.environ.get("HOME")
    os.environ["HOME"] = str(home)  # the driver (the CLI, in this process) reads the same token
    try:
        yield f"127.0.0.1:{port}"
    finally:
        if saved is not None:
            os.environ["HOME"] = saved
        subprocess.run([*ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_shards_give_the_same_report_and_catch_a_wrong_model(cluster, tmp_path, capsys):
    import htaf_export

    model = SAMPLES / "bnn_cnn.pt"
    artifact = tmp_path / "bnn_cnn.tflite"
    assert cli.main([str(model), "--target", "tflite", "-o", str(artifact), "--no-validate"]) == 0
    rc1, one = validate_cli(capsys, model, artifact, tmp_path / "one.json")
    rc2, sharded = validate_cli(capsys, model, artifact, tmp_path / "ray.json", "--ray", cluster)
    assert rc1 == rc2 == 0 and counts(one) == counts(sharded)
    assert sharded["backends"][0]["samples"] > 0
    # a batch-norm statistic nudged by 1e-3: the artifact no longer matches; the cluster must say so too
    loaded = htaf_export.load(model)
    loaded.module.layers.bn_out.running_mean[7] += 1e-3
    nudged = htaf_export.save(loaded.module, tmp_path / "nudged.pt")
    rc1, one = validate_cli(capsys, nudged, artifact, tmp_path / "bad1.json")
    rc2, sharded = validate_cli(capsys, nudged, artifact, tmp_path / "bad2.json", "--ray", cluster, "--workers", "2")
    assert rc1 == rc2 == 1
    assert one["first_failure"] == sharded["first_failure"] and one["first_failure"]["tensor"] == "logits"


def test_unreachable_cluster_is_one_line_exit_2(tmp_path, capsys):
    artifact = tmp_path / "bnn_mlp.onnx"
    assert cli.main([str(SAMPLES / "bnn_mlp.pt"), "--target", "onnx", "-o", str(artifact), "--no-validate"]) == 0
    capsys.readouterr()
    port = _free_port()  # nothing listens there
    rc = cli.main(["validate", str(SAMPLES / "bnn_mlp.pt"), str(artifact), "--ray", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot reach a Ray cluster" in err and len(err.strip().splitlines()) == 1, err
