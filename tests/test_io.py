"""Loading and saving: the checkpoint, TorchScript, .pt2, trusted pickles, and every kind of bad file."""

from __future__ import annotations

import hashlib
import io
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import htaf_export
from htaf_export.io import resolve
from htaf_export import models
from htaf_export.errors import BadInput
from htaf_export.nn import HTAF, BinaryConv2d, BinaryLinear

from conftest import SAMPLE_NAMES, outputs_equal, save_pt2

CHECKPOINT_KEYS = {"format", "version", "arch", "config", "state_dict", "input_shape", "meta"}


def _bad(path, **kwargs) -> str:
    """Load must fail with BadInput and a one-line message; return the message."""
    with pytest.raises(BadInput) as info:
        htaf_export.load(path, **kwargs)
    msg = str(info.value)
    assert msg.strip() and "\n" not in msg, f"not one line: {msg!r}"
    assert "Traceback" not in msg
    return msg


def _randomized(arch: str, config: dict | None = None, seed: int = 0) -> torch.nn.Module:
    """A model with non-trivial weights and batch-norm statistics, in eval mode."""
    torch.manual_seed(seed)
    m = models.build(arch, config)
    with torch.no_grad():
        for name, b in m.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.3)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
        for name, p in m.named_parameters():
            if "bn" in name:
                p.normal_(0, 0.5)
    return m.eval()


# ------------------------------------------------------------------------------------------ checkpoint


def test_sample_checkpoints_load(sample_path, sample_name, digits_test):
    ld = htaf_export.load(sample_path)
    assert ld.source_format == "checkpoint" and ld.arch == sample_name
    assert ld.family == sample_name.split("_")[0]
    assert ld.sha256 == hashlib.sha256(sample_path.read_bytes()).hexdigest()
    assert not ld.module.training
    assert ld.meta.get("trained_on") == "sklearn digits"
    x, y = digits_test(ld.input_shape)
    out = ld.module(x)
    logits = out[0] if isinstance(out, tuple) else out
    # Trained weights were really loaded: far better than chance (10 classes).
    assert (logits.argmax(1) == y).float().mean() > 0.9


@pytest.mark.parametrize("arch", sorted(SAMPLE_NAMES))
def test_checkpoint_round_trip_same_outputs(arch, tmp_path):
    m = _randomized(arch, seed=1)
    path = htaf_export.save(m, tmp_path / "m.pt", meta={"note": "round trip", "n": 3})
    assert path == tmp_path / "m.pt" and path.is_file()
    ld = htaf_export.load(path)
    assert ld.arch == arch and ld.config == m.config and ld.input_shape == m.input_shape
    assert ld.meta == {"note": "round trip", "n": 3}
    assert ld.output_names == list(m.output_names)
    x = torch.rand(4, *m.input_shape)
    assert outputs_equal(ld.module(x), m(x))
    # A model with other random weights gives other outputs, so the comparison is meaningful.
    assert not outputs_equal(_randomized(arch, seed=2)(x), m(x))


def test_checkpoint_round_trip_keeps_annealed_htaf_parameters(tmp_path):
    """train.py sharpens alpha during training; the trained alpha must come back, not the constructor's."""
    m = _randomized("dhn_mlp", dict(hidden=[16, 8], alpha=1.0, beta=4.0))
    for h in m.modules():
        if isinstance(h, HTAF):
            h.alpha, h.beta = 25.0, 3.0
    ld = htaf_export.load(htaf_export.save(m, tmp_path / "m.pt"))
    assert [(h.alpha, h.beta) for h in ld.module.modules() if isinstance(h, HTAF)] == [(25.0, 3.0)] * 2
    x = torch.randn(5, 64)
    assert torch.equal(ld.module(x), m(x))


def test_checkpoint_of_hardened_model(tmp_path):
    m = _randomized("bnn_mlp", dict(hidden=[32, 16], scale=True))
    hard = htaf_export.harden(m).model
    ld = htaf_export.load(htaf_export.save(hard, tmp_path / "h.pt"))
    binary = [x for x in ld.module.modules() if isinstance(x, (BinaryLinear, BinaryConv2d))]
    assert binary and all(b.frozen for b in binary)
    assert all(set(b.weight.unique().tolist()) <= {-1.0, 1.0} for b in binary)
    x = torch.randn(6, 64)
    assert torch.equal(htaf_export.harden(ld.module).model(x), hard(x))


def test_checkpoint_readable_with_weights_only(tmp_path, sample_paths):
    m = _randomized("icbm_cnn")
    path = htaf_export.save(m, tmp_path / "m.pt", meta={"a": 1.5})
    for p in (path, sample_paths["bnn_cnn"]):
        obj = torch.load(p, weights_only=True)
        assert set(obj) == CHECKPOINT_KEYS
        assert obj["format"] == "htaf-export/checkpoint" and obj["version"] == 1
        assert obj["arch"] in models.architectures()
        assert isinstance(obj["config"], dict) and isinstance(obj["meta"], dict)
        assert all(isinstance(d, int) for d in obj["input_shape"])
    obj = torch.load(path, weights_only=True)
    assert obj["arch"] == "icbm_cnn" and obj["input_shape"] == [1, 8, 8] and obj["meta"] == {"a": 1.5}
    assert torch.equal(obj["state_dict"]["head.weight"], m.state_dict()["head.weight"])


@pytest.mark.parametrize("meta", [{"acc": np.float64(0.5)}, {"where": Path("x")}, {"f": lambda: 0}])
def test_save_refuses_meta_that_weights_only_cannot_read(meta, tmp_path):
    with pytest.raises(BadInput, match="weights_only"):
        htaf_export.save(models.build("dhn_mlp", dict(hidden=[4])), tmp_path / "m.pt", meta=meta)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_unregistered_module_and_missing_input_shape(tmp_path):
    with pytest.raises(BadInput, match="input_shape"):
        htaf_export.save(torch.nn.Linear(3, 2), tmp_path / "a.pt")
    lin = torch.nn.Linear(3, 2)
    lin.input_shape = [3]
    with pytest.raises(BadInput, match="not a registered architecture"):
        htaf_export.save(lin, tmp_path / "a.pt")
    with pytest.raises(BadInput, match="unknown save format"):
        htaf_export.save(models.build("dhn_mlp"), tmp_path / "a.pt", format="onnx")
    assert list(tmp_path.iterdir()) == []


def test_save_to_bad_output_path(tmp_path):
    m = models.build("dhn_mlp", dict(hidden=[4]))
    with pytest.raises(BadInput, match="does not exist"):
        htaf_export.save(m, tmp_path / "no" / "such" / "m.pt")
    (tmp_path / "d").mkdir()
    with pytest.raises(BadInput, match="is a directory"):
        htaf_export.save(m, tmp_path / "d")


# ------------------------------------------------------------------------------- TorchScript and .pt2


@pytest.mark.parametrize("name", SAMPLE_NAMES)
@pytest.mark.parametrize("fmt,source", [("torchscript", "torchscript"), ("pt2", "exported_program")])
def test_torchscript_and_pt2_round_trip_of_hardened_model(name, fmt, source, load_sample, digits_test, tmp_path):
    ld = load_sample(name)
    hard = htaf_export.harden(ld.module).model
    path = htaf_export.save(hard, tmp_path / f"m.{fmt}", format=fmt, meta={"k": "v"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"m.{fmt}"]  # no temporary file left behind
    back = htaf_export.load(path)
    assert back.source_format == source
    assert back.input_shape == ld.input_shape and back.family == ld.family
    assert back.output_names == ld.output_names and back.meta == {"k": "v"}
    x, _ = digits_test(ld.input_shape, 64)
    # pt2 is exported with a dynamic batch: another batch size must work too.
    for batch in (x, x[:3]):
        assert outputs_equal(back.module(batch), hard(batch))
    # Its sites are recognised as exact steps, so hardening it again is allowed and changes nothing.
    again = htaf_export.harden(back.module)
    assert [s.name for s in again.sites] == [s.name for s in htaf_export.harden(ld.module).sites]
    assert all(s.was == "step" for s in again.sites)


def test_torchscript_without_spec_needs_a_shape_from_one_of_three_places(tmp_path, npz_file):
    m = htaf_export.harden(models.build("dhn_mlp", dict(hidden=[4]))).model
    path = tmp_path / "plain.ts"
    torch.jit.save(torch.jit.trace(m, torch.zeros(2, 64)), str(path))
    loaded = htaf_export.load(path)
    assert loaded.input_shape is None
    with pytest.raises(BadInput) as info:
        resolve(loaded)
    message = str(info.value)
    assert "--input-shape" in message and "--data" in message and "htaf_export.save" in message
    assert resolve(loaded, [64]).input_shape == [64]
    assert resolve(loaded, data=npz_file(x=np.zeros((3, 64), np.float32))).input_shape == [64]
    assert resolve(loaded, [64]).output_names == ["logits"]
    with pytest.raises(BadInput, match="does not run on inputs of shape"):
        resolve(loaded, [8, 8])


# ------------------------------------------------------------------------------------------- pickles


def test_pickled_module_needs_trust(tmp_path, load_sample):
    module = load_sample("dhn_mlp").module
    path = tmp_path / "pickled.pt"
    torch.save(module, path)
    msg = _bad(path)
    assert "--trust-pickle" in msg
    ld = htaf_export.load(path, trust_pickle=True)
    assert ld.source_format == "pickle" and ld.arch == "dhn_mlp" and ld.family == "dhn"
    assert ld.input_shape == [64]
    x = torch.rand(5, 64)
    assert torch.equal(ld.module(x), module(x))


def test_trusted_pickle_that_is_not_a_module(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"where": Path("x")}, path)
    assert "--trust-pickle" in _bad(path)
    assert "not an nn.Module" in _bad(path, trust_pickle=True)


class _PythonSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad):
        return grad


@pytest.mark.parametrize("trust", [False, True])
def test_torchscript_archive_that_torch_left_half_written(trust, tmp_path):
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(_PythonSign.apply(x))

    path = tmp_path / "net.ts"
    with pytest.raises(RuntimeError):  # torch.jit cannot save the Python function, after writing the weights
        torch.jit.trace(Net().eval(), torch.rand(2, 8)).save(str(path))
    assert zipfile.is_zipfile(path)
    msg = _bad(path, trust_pickle=trust)
    assert "incomplete TorchScript archive" in msg and ".pt2" in msg and "pickle" not in msg


def test_a_time_first_torchscript_trace_is_told_how_to_save_instead(tmp_path):
    class TimeFirst(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(6, 3)

        def forward(self, x):  # [T, N, F]: the trace unrolls T = 4
            return sum((self.fc(x[t]) > 0).float() for t in range(x.shape[0]))

    path = tmp_path / "tf.ts"
    torch.jit.save(torch.jit.trace(TimeFirst().eval(), torch.rand(4, 3, 6)), str(path))
    with pytest.raises(BadInput, match="read batch first: a time-first model"):
        resolve(htaf_export.load(path), [5, 6])


# ---------------------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    assert "does not exist" in _bad(tmp_path / "nope.pt")


def test_directory(tmp_path):
    assert "directory" in _bad(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "empty" in _bad(tmp_path / "empty.pt")


@pytest.mark.parametrize("name", ["dhn_mlp", "bnn_cnn"])
def test_truncated_checkpoint(name, sample_paths, tmp_path):
    data = sample_paths[name].read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 100):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        assert "corrupt" in _bad(tmp_path / "cut.pt")


def test_truncated_torchscript_and_pt2(tmp_path):
    m = htaf_export.harden(models.build("dhn_mlp", dict(hidden=[8]))).model
    for fmt in ("torchscript", "pt2"):
        data = htaf_export.save(m, tmp_path / f"m.{fmt}", format=fmt).read_bytes()
        (tmp_path / f"cut.{fmt}").write_bytes(data[: len(data) // 2])
        _bad(tmp_path / f"cut.{fmt}")


@pytest.mark.parametrize("prefix", [b"", b"PK\x03\x04", b"\x80\x02"])
def test_random_garbage(prefix, tmp_path):
    rng = random.Random(0)
    (tmp_path / "garbage.pt").write_bytes(prefix + bytes(rng.randrange(256) for _ in range(4096)))
    _bad(tmp_path / "garbage.pt")


@pytest.mark.parametrize("where", [0.3, 0.5, 0.9, 0.995])
def test_zip_with_flipped_bytes(where, sample_paths, tmp_path):
    """Flipped bytes in the weights (middle), or in the archive's directory (end), never load silently."""
    data = bytearray(sample_paths["dhn_mlp"].read_bytes())
    at = int(len(data) * where)
    for i in range(at, at + 16):
        data[i] ^= 0xFF
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    assert "corrupt" in _bad(tmp_path / "flipped.pt")


def test_flipped_weight_byte_in_saved_checkpoint(tmp_path):
    """One flipped bit inside a weight tensor: the CRC catches it."""
    m = _randomized("dhn_mlp", dict(hidden=[32]))
    path = htaf_export.save(m, tmp_path / "m.pt")
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)  # the largest tensor
    data = bytearray(path.read_bytes())
    data[info.header_offset + 200 + info.file_size // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert "CRC" in _bad(path)


def test_plain_state_dict(tmp_path):
    torch.save(models.build("dhn_mlp").state_dict(), tmp_path / "sd.pt")
    assert "not a model: save the model itself" in _bad(tmp_path / "sd.pt")


def test_tensor_file(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    assert "not a model" in _bad(tmp_path / "t.pt")


@pytest.mark.parametrize("text", ["hello\n", '{"format": "htaf-export/checkpoint"}', "PK but not a zip"])
def test_text_file(text, tmp_path):
    (tmp_path / "model.pt").write_text(text)
    _bad(tmp_path / "model.pt")


def _tampered(sample_paths, tmp_path, **changes) -> Path:
    obj = torch.load(sample_paths["dhn_mlp"], weights_only=True)
    for k, v in changes.items():
        if v is None:
            del obj[k]
        else:
            obj[k] = v
    path = tmp_path / "tampered.pt"
    torch.save(obj, path)
    return path


def test_unknown_architecture(sample_paths, tmp_path):
    msg = _bad(_tampered(sample_paths, tmp_path, arch="resnet_9000"))
    assert "resnet_9000" in msg and "dhn_mlp" in msg  # names the architecture, lists the known ones


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_wrong_version(version, sample_paths, tmp_path):
    path = _tampered(sample_paths, tmp_path, version=version)
    assert "version" in _bad(path)


def test_wrong_format_tag(sample_paths, tmp_path):
    _bad(_tampered(sample_paths, tmp_path, format="something-else"))


def test_missing_state_dict(sample_paths, tmp_path):
    assert "state_dict" in _bad(_tampered(sample_paths, tmp_path, state_dict=None))


def test_config_not_accepted(sample_paths, tmp_path):
    obj = torch.load(sample_paths["dhn_mlp"], weights_only=True)
    assert "does not accept" in _bad(_tampered(sample_paths, tmp_path, config={**obj["config"], "depth": 3}))


def test_state_dict_that_does_not_fit(sample_paths, tmp_path):
    obj = torch.load(sample_paths["dhn_mlp"], weights_only=True)
    # Shapes that do not fit the config.
    msg = _bad(_tampered(sample_paths, tmp_path, config={**obj["config"], "hidden": [10, 10]}))
    assert "do not fit" in msg and "size mismatch" in msg
    # A weight missing.
    sd = dict(obj["state_dict"])
    del sd["layers.fc1.weight"]
    msg = _bad(_tampered(sample_paths, tmp_path, state_dict=sd))
    assert "do not fit" in msg and "layers.fc1.weight" in msg
    # An unexpected weight.
    sd = {**obj["state_dict"], "layers.extra.weight": torch.zeros(2)}
    assert "layers.extra.weight" in _bad(_tampered(sample_paths, tmp_path, state_dict=sd))


# ------------------------------------------------------------------------------------------ atomicity


def _failing_writer(real):
    """Writes some bytes to the destination path, then fails as a full disk would."""

    def write(obj, f, *args, **kwargs):
        if isinstance(f, io.BytesIO):
            return real(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"PK\x03\x04partial")
        raise OSError(28, "No space left on device")

    return write


@pytest.mark.parametrize("fmt,target", [("checkpoint", (torch, "save")), ("torchscript", (torch.jit, "save")),
                                        ("pt2", (torch.export, "save"))])
def test_failed_write_leaves_no_file(fmt, target, tmp_path, monkeypatch):
    m = htaf_export.harden(models.build("dhn_mlp", dict(hidden=[8]))).model
    monkeypatch.setattr(*target, _failing_writer(getattr(*target)))
    with pytest.raises(BadInput, match="cannot write .*No space left"):  # one line for the user, exit 2
        htaf_export.save(m, tmp_path / "out.bin", format=fmt)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_existing_file(tmp_path, monkeypatch):
    m = models.build("dhn_mlp", dict(hidden=[8]))
    path = htaf_export.save(m, tmp_path / "m.pt")
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _failing_writer(torch.save))
    with pytest.raises(BadInput, match="No space left"):
        htaf_export.save(models.build("dhn_mlp", dict(hidden=[16])), path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
    assert path.read_bytes() == before
    monkeypatch.undo()
    assert htaf_export.load(path).config["hidden"] == [8]


@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt()])
def test_atomic_write_cleans_up_on_any_error(error, tmp_path):
    from htaf_export.files import atomic_write

    def write(tmp: Path) -> None:
        assert tmp.parent == tmp_path and tmp.name != "out.bin"
        tmp.write_bytes(b"half")
        raise error

    with pytest.raises(type(error)):
        atomic_write(tmp_path / "out.bin", write)
    assert list(tmp_path.iterdir()) == []
    atomic_write(tmp_path / "out.bin", lambda tmp: tmp.write_bytes(b"whole"))
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    assert (tmp_path / "out.bin").read_bytes() == b"whole"


def test_pt2_save_is_quiet(tmp_path, caplog):
    """The temporary file keeps the .pt2 suffix, so torch.export.save does not warn about its name."""
    m = htaf_export.harden(models.build("dhn_mlp", dict(hidden=[8]))).model
    htaf_export.save(m, tmp_path / "m.pt2", format="pt2")
    assert not [r for r in caplog.records if "Expect archive file" in r.getMessage()]
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]


@pytest.mark.parametrize("layer", ["batch_norm", "dropout"])
def test_a_program_exported_in_training_mode_is_refused_in_one_line(tmp_path, layer):
    body = torch.nn.BatchNorm1d(5) if layer == "batch_norm" else torch.nn.Dropout(0.5)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), body, torch.nn.Linear(5, 2)).train()  # model.eval() forgotten
    path = tmp_path / "train.pt2"
    save_pt2(model, torch.randn(3, 4), path)
    with pytest.raises(BadInput, match="training mode .*call model.eval"):
        htaf_export.load(path)
    model.eval()
    save_pt2(model, torch.randn(3, 4), path)
    assert htaf_export.load(path).input_shape == [4]


def test_the_advice_for_a_users_own_class_works(tmp_path, capsys):
    """What the refusals of a state dict and of an unimportable pickle tell a user to do: save a .pt2."""

    class OwnNet(torch.nn.Module):  # a user's class, registered nowhere
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)
            self.step = HTAF()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.step(self.fc1(x)))

    path = htaf_export.save(OwnNet().eval(), tmp_path / "model.pt2", input_shape=[6])
    assert htaf_export.load(path).source_format == "exported_program"
    from htaf_export import cli

    assert cli.main([str(path), "--target", "onnx", "-o", str(tmp_path / "m.onnx")]) == 0


def test_a_submodule_named_meta_is_named_in_the_refusal(tmp_path):
    """torch.export saves it, but fx's GraphModule keeps ``meta`` for itself: torch cannot rebuild the program."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.meta, self.out = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out((self.meta(x) >= 0).float())

    path = save_pt2(Net().eval(), torch.randn(2, 8), tmp_path / "meta.pt2")
    with pytest.raises(BadInput, match="a submodule is named 'meta'.*rename it"):
        htaf_export.load(path)


def test_time_first_data_for_a_batch_first_input_is_told_to_move_its_axes(tmp_path):
    from htaf_export.data import load_npz

    np.savez(tmp_path / "d.npz", x=np.zeros((8, 50, 20), np.float32))  # [T, N, F] for a model taking [N, T, F]
    with pytest.raises(BadInput, match=r"looks time first: store it batch first \(np.moveaxis\(x, 1, 0\)\)"):
        load_npz(tmp_path / "d.npz", [8, 20])
    with pytest.raises(BadInput) as refused:  # a plain misfit gets no such hint
        load_npz(tmp_path / "d.npz", [7, 20])
    assert "time first" not in str(refused.value)


class BatchStatistics(torch.nn.Module):
    """A batch norm without running statistics: in eval too it normalizes each batch by its own statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = torch.nn.Linear(10, 16), torch.nn.BatchNorm1d(16, track_running_stats=False)
        self.out = torch.nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out((self.bn(self.fc(x)) >= 0).float())


@pytest.mark.parametrize("fmt", ["pt2", "pickle", "torchscript"])
def test_a_batch_norm_without_running_statistics_is_refused_in_one_line(tmp_path, capsys, fmt):
    """Was: a .pt2 told to call model.eval() (it was in eval), a pickle passed with outputs that depend on the rest
    of the batch, TorchScript an internal error (exit 3)."""
    from htaf_export import cli

    model, path = BatchStatistics().eval(), tmp_path / ("m.pt2" if fmt == "pt2" else "m.pt")
    if fmt == "pt2":
        htaf_export.save(model, path, input_shape=[10])
    elif fmt == "pickle":
        torch.save(model, path)
    else:
        torch.jit.save(torch.jit.trace(model, torch.randn(4, 10)), path)
    capsys.readouterr()
    code = cli.main([str(path), "--target", "onnx", "-o", str(tmp_path / "m.onnx"), "--input-shape", "10",
                     "--trust-pickle"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "keeps no running statistics" in err and "'bn'" in err, err
    assert not (tmp_path / "m.onnx").exists()
