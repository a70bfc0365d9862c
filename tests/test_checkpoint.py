"""segmentation.engine.resume and segmentation.checkpoints: a run resumes only on the split and architecture it
trained on; checkpoints of earlier versions load, resume and predict."""

import dataclasses
import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import test_script
import torch
import torch.nn.functional as F

import training
from model import UNet, build_model
from segmentation.checkpoints import Progress, load_weights, save_checkpoint
from segmentation.config import UserError, architecture_differences, load_config
from segmentation.engine.resume import (
    FIRST_CONVOLUTION,
    load_checkpoint,
    load_initial_weights,
    load_optimizer_state,
    read_initial_weights,
)
from segmentation.files import no_room_reason
from segmentation.inference.objects import ObjectRules
from segmentation.inference.trained import load_trained
from segmentation.runs.folders import write_metrics
from tests.helpers import ROOT, folder_config, plan_of, tiny_config
from training import train


def check_resume(path, config) -> dict:
    """``load_checkpoint`` of ``path`` for a run of ``config``."""
    return load_checkpoint(path, config.unet, config.data, config.train.seed)


def as_written_before_plans(state: dict) -> dict:
    """A checkpoint as 50b432b wrote it, before plans: its decisions in its stored config (the boundary class and
    the tile size as decided) and beside it (``objects``, the calibrated ``threshold``), no ``plan``."""
    old = {key: value for key, value in state.items() if key != "plan"}
    plan = state["plan"]
    old["config"]["unet"]["boundary_class"] = plan["boundary_class"]
    old["config"]["train"]["tile_size"] = plan["tile_size"]
    old["objects"] = {"instance_data": plan["mask_reading"] == "instances", "learnt_size": plan["learnt_object_size"]}
    if plan["threshold_source"] == "calibrated":
        old["threshold"] = plan["threshold"]
    return old


@pytest.mark.slow
def test_resuming_under_another_train_seed_is_refused_only_where_the_split_changes(image_folder):
    result = training.train(folder_config(image_folder, "train.folds=3", "train.fold=0", "train.max_epochs=1"))
    last = result.folders.weights / "last.pt"
    check_resume(
        last, folder_config(image_folder, "train.folds=3", "train.fold=0", "train.seed=5", "train.split_seed=0")
    )
    with pytest.raises(
        UserError, match=r"another split \(train.split_seed \(else train.seed\): checkpoint 0, config 5\)"
    ):
        check_resume(last, folder_config(image_folder, "train.folds=3", "train.fold=0", "train.seed=5"))


@pytest.mark.slow
def test_resuming_on_another_fold_is_refused(image_folder):
    config = folder_config(image_folder, "train.folds=3", "train.fold=0", "train.max_epochs=1")
    last = training.train(config).folders.weights / "last.pt"
    assert last.parent.name.endswith("-fold0")
    check_resume(last, config)  # the same fold resumes
    with pytest.raises(
        UserError,
        match=(
            r"trained on another split \(train.fold: checkpoint 0, config 1\): resuming would mix its test "
            r"images into training"
        ),
    ):
        check_resume(last, folder_config(image_folder, "train.folds=3", "train.fold=1", "train.max_epochs=1"))
    # a checkpoint of a version without the fold keys resumes as one without folds
    state = torch.load(last, weights_only=True)
    for key in ("folds", "fold", "fold_order"):
        del state["config"]["train"][key]
    torch.save(state, last)
    with pytest.raises(UserError, match=r"another split \(train.folds: checkpoint None, config 3\)"):
        check_resume(last, config)
    check_resume(last, folder_config(image_folder, "train.max_epochs=1"))


@pytest.mark.slow
def test_a_checkpoint_of_an_earlier_version_loads_resumes_and_predicts(tmp_path):
    """Checkpoints written before plans (50b432b) keep their decisions in their stored config, those written
    before the settings were typed (ed6eb72) store the seed's legacy keys as null and lack keys that came later:
    test.py loads them with the decisions they made, and a run resumes from them."""
    summary = train(tiny_config(tmp_path, "train.max_epochs=1", "train.run_name=old", "predict.threshold=auto"))
    best = summary.folders.weights / "best.pt"
    written = torch.load(best, weights_only=True)
    plan = written["plan"]
    state = as_written_before_plans(written)
    state["config"]["unet"].update(use_ln=None, input_shape=None)
    del state["config"]["train"]["split_seed"]
    torch.save(state, best)
    trained = load_trained(best)
    assert trained.config.data.split_seed_or(trained.config.train.seed) == 0 and trained.config.unet.norm == "batch"
    assert all(torch.equal(tensor, state["model"][name]) for name, tensor in trained.model.state_dict().items())
    assert trained.predictor.threshold == plan["threshold"] and trained.plan.threshold_source == "calibrated"
    assert trained.plan.tile_size == plan["tile_size"] == 60
    assert trained.datasets().val is not None  # its balanced class weights decided again from the data
    resumed = train(tiny_config(tmp_path, "train.max_epochs=2", f"train.resume={best}"))
    assert resumed.folders.weights == summary.folders.weights and resumed.progress.epoch == 2
    assert torch.load(resumed.folders.weights / "last.pt", weights_only=True)["plan"]["tile_size"] == 60


def saved_state(model: UNet, widths=(4, 8), classes=2, channels=1) -> dict:
    """What a checkpoint of ``model`` holds that train.init_from reads: weights, settings, progress."""
    settings = load_config(None, [f"unet.input_channels={list(widths)}", f"unet.image_channels={channels}"])
    config = settings.with_values({"unet.num_classes": classes, "train.dataset_name": "folder"}).to_dict()
    return {"model": model.state_dict(), "config": config, "progress": Progress("source", epoch=7).to_dict()}


def test_init_from_loads_every_matching_tensor_adapts_the_first_convolution_and_leaves_the_output_layer_new():
    torch.manual_seed(0)
    gray = UNet(1, 2, (4, 8), norm="batch")
    torch.manual_seed(1)
    rgb = UNet(3, 3, (4, 8), norm="batch")
    fresh_output = {name: tensor.clone() for name, tensor in rgb.state_dict().items() if name.startswith("outc.")}
    message = load_initial_weights(rgb, saved_state(gray), Path("gray.pt"))
    assert message.startswith("train.init_from: 64 of 66 tensors from gray.pt (epoch 7)")
    assert "first convolution adapted from 1 to 3 image channel(s)" in message and "starting fresh: outc" in message
    for name, tensor in rgb.state_dict().items():
        if name.startswith("outc."):
            assert torch.equal(tensor, fresh_output[name]), name  # another number of classes: its own start
        elif name != FIRST_CONVOLUTION:
            assert torch.equal(tensor, gray.state_dict()[name]), name
    # an RGB image whose channels are equal gets the gray model's response from the adapted convolution
    image = torch.rand(1, 1, 12, 12)
    gray_response = F.conv2d(image, gray.state_dict()[FIRST_CONVOLUTION])
    rgb_response = F.conv2d(image.repeat(1, 3, 1, 1), rgb.state_dict()[FIRST_CONVOLUTION])
    torch.testing.assert_close(rgb_response, gray_response)
    back = UNet(1, 2, (4, 8), norm="batch")
    load_initial_weights(back, saved_state(rgb, classes=3, channels=3), Path("rgb.pt"))  # and RGB to gray: the sum
    expected = rgb.state_dict()[FIRST_CONVOLUTION].sum(dim=1, keepdim=True)
    torch.testing.assert_close(back.state_dict()[FIRST_CONVOLUTION], expected)


def test_init_from_refuses_another_network_and_unreadable_files_in_one_line(tmp_path):
    torch.save(saved_state(UNet(1, 2, (4, 8), norm="batch")), tmp_path / "small.pt")
    deeper = load_config(None, ["unet.input_channels=[4, 8, 16]", "unet.norm=layer"]).unet
    with pytest.raises(UserError) as caught:
        read_initial_weights(tmp_path / "small.pt", deeper)
    assert str(caught.value) == (
        f"train.init_from: {tmp_path / 'small.pt'} holds another network (unet.input_channels: checkpoint [4, 8], "
        "config [4, 8, 16]; unet.norm: checkpoint 'batch', config 'layer'): a run can start from a checkpoint of "
        "other unet.num_classes or unet.image_channels only; set these keys as in the checkpoint"
    )
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    torch.save({"model": CodeOnLoad(), "config": {}, "progress": {}}, tmp_path / "code.pt")
    expected = {
        "missing.pt": "checkpoint not found",
        "text.pt": "not a checkpoint file",
        "code.pt": "holds objects that loading would have to import and run",
    }
    unet = load_config(None, ["unet.input_channels=[4, 8]"]).unet
    for name, reason in expected.items():
        with pytest.raises(UserError, match=f"^train.init_from: {tmp_path / name}: {reason}") as caught:
            read_initial_weights(tmp_path / name, unet)
        assert "\n" not in str(caught.value)
    assert not (tmp_path / "ran").exists()  # the pickle's code never ran


class CodeOnLoad:
    """An object whose unpickling would run a command (``touch ran``), as a malicious checkpoint does."""

    def __reduce__(self):
        return (os.system, ("touch ran",))


@pytest.mark.slow
def test_a_run_starts_from_another_runs_weights_with_everything_else_fresh(tmp_path, capsys):
    first = train(tiny_config(tmp_path, "train.max_epochs=2", "train.run_name=source"))
    source = first.folders.weights / "best.pt"
    capsys.readouterr()
    second = train(
        tiny_config(
            tmp_path, "train.max_epochs=1", "train.run_name=target", "unet.num_classes=3", f"train.init_from={source}"
        )
    )
    notes = [line for line in capsys.readouterr().err.splitlines() if "train.init_from" in line]
    assert (
        len(notes) == 1 and notes[0].startswith("note: train.init_from: 64 of 66 tensors from") and "outc" in notes[0]
    )
    assert (
        second.folders.weights.name == "target" and second.progress.epoch == 1 and second.progress.step == 4
    )  # a fresh count
    last = torch.load(second.folders.weights / "last.pt", weights_only=True)
    assert last["config"]["train"]["init_from"] == str(source)
    steps = {entry["step"].item() for entry in last["optimizer"]["state"].values()}
    assert steps == {4.0}  # Adam's moments started with this run, not the source's 8 steps
    with pytest.raises(UserError, match="^train.init_from: .*missing.pt: checkpoint not found$"):
        train(tiny_config(tmp_path / "elsewhere", "train.init_from=missing.pt"))
    assert not (tmp_path / "elsewhere").exists()  # nothing written


def test_a_checkpoint_rebuilds_its_boundary_class_and_object_rules(tmp_path):
    config = tiny_config(tmp_path, "unet.boundary_class=true")
    plan = dataclasses.replace(
        plan_of(config), boundary_class=True, mask_reading="instances", learnt_object_size=14, min_object_size=14
    )
    plan = dataclasses.replace(plan, fill_holes=True, class_weights=None)
    model = build_model(config.unet, plan.boundary_class)
    state = {"model": model.state_dict(), "config": config.to_dict(), "progress": Progress("run", epoch=1).to_dict()}
    torch.save({**state, "plan": plan.to_dict()}, tmp_path / "best.pt")
    trained = load_trained(tmp_path / "best.pt")
    assert trained.model.out_channels == 3 and trained.plan == plan
    assert trained.predictor.rules == ObjectRules(14, True)
    # the predict settings in force go on top: a number or true/false replaces the plan's decision
    overridden = load_trained(tmp_path / "best.pt", None, ["predict.min_object_size=3", "predict.fill_holes=false"])
    assert overridden.predictor.rules == ObjectRules(3, False) and overridden.plan == plan
    # from before plans, the object record: before it, nothing cleaned
    old = as_written_before_plans({**state, "config": config.to_dict(), "plan": plan.to_dict()})
    torch.save(old, tmp_path / "old.pt")
    assert load_trained(tmp_path / "old.pt").predictor.rules == ObjectRules(14, True)
    del old["objects"]
    torch.save(old, tmp_path / "older.pt")
    assert load_trained(tmp_path / "older.pt").predictor.rules == ObjectRules()
    # a checkpoint from before unet.boundary_class has none, whatever the config says now
    oldest = tiny_config(tmp_path).to_dict()
    del oldest["unet"]["boundary_class"]
    oldest["train"]["tile_size"] = 60
    torch.save(
        {"model": build_model(tiny_config(tmp_path).unet).state_dict(), "config": oldest, "progress": {"epoch": 0}},
        tmp_path / "oldest.pt",
    )
    assert load_trained(tmp_path / "oldest.pt").model.out_channels == 2
    unet = load_config(None, ["unet.boundary_class=false"]).unet
    assert architecture_differences(oldest, unet, False, ["boundary_class"]) == []
    assert architecture_differences(config.to_dict(), tiny_config(tmp_path).unet, True) == []  # auto matches either
    assert architecture_differences(config.to_dict(), unet, True, ["boundary_class"]) == [
        "unet.boundary_class: checkpoint True, config False"
    ]


def test_init_from_a_two_class_model_starts_a_new_output_layer_for_the_border_class():
    torch.manual_seed(0)
    plain = UNet(1, 2, (4, 8), norm="batch")
    bordered = UNet(1, 2, (4, 8), norm="batch", boundary_class=True)
    message = load_initial_weights(bordered, saved_state(plain), Path("plain.pt"))
    assert message.startswith("train.init_from: 64 of 66 tensors from plain.pt") and "starting fresh: outc" in message
    assert bordered.state_dict()["outc.weight"].shape[0] == 3
    for name, tensor in bordered.state_dict().items():
        if not name.startswith("outc."):
            assert torch.equal(tensor, plain.state_dict()[name]), name


def untrained_checkpoint(path: Path, config, run_name: str = "run") -> dict:
    """A checkpoint of an untrained network of ``config`` as test.py reads it (weights, config, plan, progress),
    written to ``path``; returns its contents, to be edited and written again."""
    plan = plan_of(config)
    torch.manual_seed(0)
    model = build_model(config.unet, plan.boundary_class)
    state = {
        "model": model.state_dict(),
        "config": config.to_dict(),
        "plan": plan.to_dict(),
        "progress": Progress(run_name, epoch=1).to_dict(),
    }
    torch.save(state, path)
    return state


def one_error_line(capsys) -> str:
    """The single line a refusal printed on stderr (asserted to be one)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("name", ["../../../../tmp/x", "/tmp/x", "", ".", "..", "a/b", "a\\b", "run\0x", 7])
def test_a_run_name_read_from_a_checkpoint_must_be_one_folder_name(name):
    with pytest.raises(UserError) as caught:
        Progress.from_dict({"epoch": 3, "run_name": name}, Path("weights/run/last.pt"))
    assert str(caught.value) == (
        f"weights/run/last.pt: its progress names the run {name!r}, which is not one folder name (edited?): a run's "
        "folders are named by train.save_path and train.log_path; use a checkpoint as training.py wrote it"
    )


def test_a_run_name_of_one_folder_is_read_and_a_missing_one_is_the_checkpoints_folder():
    assert Progress.from_dict({"epoch": 3, "run_name": "2026-12-01_120000-synthetic-2"}, Path("x.pt")).epoch == 3
    assert Progress.from_dict({"epoch": 0}, Path("last.pt")).run_name == Path.cwd().name  # from before run names


def test_test_py_writes_under_the_config_in_force_never_under_the_paths_a_checkpoint_stores(
    tmp_path, monkeypatch, capsys, shared_cache
):
    stored = tmp_path / "stored"
    config = tiny_config(stored, f"train.cache_dir={stored / 'cache'}")
    untrained_checkpoint(tmp_path / "best.pt", config)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)  # the shipped config.yaml's relative logs/ and cache/ land here
    assert test_script.main(["--checkpoint", str(tmp_path / "best.pt")]) == 0, capsys.readouterr().err
    assert (here / "logs" / "run" / "diagnostics" / "masks").is_dir()
    # the cache of the config in force: the tests' shared one (conftest.py; a user's: config.yaml's cache/)
    assert any(shared_cache.glob("synthetic*")) and not stored.exists()
    # an override of the folders is the config in force too
    arguments = ["--checkpoint", str(tmp_path / "best.pt"), f"train.log_path={tmp_path / 'mine'}"]
    assert test_script.main(arguments) == 0
    assert (tmp_path / "mine" / "run" / "diagnostics").is_dir() and not stored.exists()


def test_test_py_refuses_a_checkpoint_whose_run_name_leaves_the_run_folders(tmp_path, monkeypatch, capsys):
    state = untrained_checkpoint(tmp_path / "best.pt", tiny_config(tmp_path / "stored"), run_name="../../escaped")
    monkeypatch.chdir(tmp_path)
    assert test_script.main(["--checkpoint", str(tmp_path / "best.pt")]) == 1
    assert "its progress names the run '../../escaped', which is not one folder name" in one_error_line(capsys)
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "logs").exists()
    assert state["progress"]["run_name"] == "../../escaped"


def test_weights_holding_nan_or_inf_are_refused_by_test_py_resume_and_init_from(tmp_path, capsys):
    config = tiny_config(tmp_path)
    state = untrained_checkpoint(tmp_path / "best.pt", config)
    state["model"]["inc.double_conv.0.weight"][0, 0, 0, 0] = float("nan")
    state["model"]["outc.bias"][1] = float("inf")
    torch.save(state, tmp_path / "best.pt")
    expected = (
        f"{tmp_path / 'best.pt'}: its weights hold NaN or infinite values (2 tensors, e.g. inc.double_conv.0.weight): "
        "use an earlier checkpoint"
    )
    assert test_script.main(["--checkpoint", str(tmp_path / "best.pt"), f"train.log_path={tmp_path / 'logs'}"]) == 1
    assert one_error_line(capsys) == f"error: {expected}"
    with pytest.raises(UserError) as caught:
        check_resume(tmp_path / "best.pt", config)
    assert str(caught.value) == expected
    with pytest.raises(UserError) as caught:
        read_initial_weights(tmp_path / "best.pt", config.unet)
    assert str(caught.value) == f"train.init_from: {expected}"
    assert not (tmp_path / "logs").exists()


def test_weights_that_do_not_fit_their_network_are_one_line(tmp_path, capsys):
    config = tiny_config(tmp_path)
    state = untrained_checkpoint(tmp_path / "best.pt", config)
    state["model"]["outc.weight"] = torch.zeros(2, 5, 1, 1)
    torch.save(state, tmp_path / "best.pt")
    assert test_script.main(["--checkpoint", str(tmp_path / "best.pt"), f"train.log_path={tmp_path / 'logs'}"]) == 1
    assert one_error_line(capsys) == (
        f"error: {tmp_path / 'best.pt'}: its weights do not fit the network its config and plan describe (tensors 1 of "
        "another shape, e.g. outc.weight: (2, 5, 1, 1) in the file, (2, 4, 1, 1) in the network; edited?): use a "
        "checkpoint as training.py wrote it"
    )
    model = build_model(config.unet)
    del state["model"]["outc.bias"]
    with pytest.raises(UserError, match=r"1 of another shape, e\.g\. outc\.weight.*; 1 missing, e\.g\. outc\.bias;"):
        load_weights(model, state["model"], tmp_path / "best.pt")


def test_an_optimizer_state_that_does_not_fit_the_network_is_one_line():
    model = UNet(1, 2, (4, 8), norm="batch")
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.zeros(1, 1, 60, 60)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    state["state"][0]["exp_avg"] = torch.zeros(3)
    fresh = torch.optim.Adam(model.parameters())
    with pytest.raises(UserError, match=r"^last\.pt: its optimizer state does not fit the network \(exp_avg of shape"):
        load_optimizer_state(fresh, state, Path("last.pt"))
    with pytest.raises(UserError, match="optimizer state does not fit the network"):
        load_optimizer_state(torch.optim.Adam(list(model.parameters())[:3]), optimizer.state_dict(), Path("last.pt"))


def test_test_py_refuses_a_checkpoint_whose_stored_widths_would_not_fit_in_memory(tmp_path, capsys):
    state = untrained_checkpoint(tmp_path / "best.pt", tiny_config(tmp_path))
    state["config"]["unet"]["input_channels"] = [100000, 200000]  # edited: its weights stay small
    torch.save(state, tmp_path / "best.pt")
    assert test_script.main(["--checkpoint", str(tmp_path / "best.pt"), f"train.log_path={tmp_path / 'logs'}"]) == 1
    line = one_error_line(capsys)
    assert line.startswith(f"error: {tmp_path / 'best.pt'}: predicting needs about ") and " are free on cpu: " in line
    # by hand, 9 weights per pair of channels: 9 x (10^5 + 10^10 + 2 x 10^10 + 4 x 10^10 + 8 x 10^10 + 16 x 10^10) in
    # the encoder, 4 x 8 x 10^10 + 9 x (8 x 10^10 + 4 x 10^10) and 4 x 2 x 10^10 + 9 x (2 x 10^10 + 10^10) in the
    # decoder: 4.5 x 10^12 parameters of 4 bytes
    assert "(parameters 18 TB, activations of 4 tiles of 572x572 px 3.5 TB)" in line
    assert line.endswith("or use a checkpoint of smaller unet.input_channels (this one has [100000, 200000])")
    assert not (tmp_path / "logs").exists()


def disk_full_after(size: int):
    """A torch.save that writes ``size`` bytes of the file, then fails as a full disk does."""

    def save(state, file):
        file.write(b"\0" * size)
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def test_a_full_disk_is_one_line_leaves_no_partial_file_and_the_earlier_checkpoint_intact(tmp_path, monkeypatch):
    folder = tmp_path / "weights" / "run"
    folder.mkdir(parents=True)
    save_checkpoint(folder / "best.pt", {"model": {"weight": torch.zeros(10)}})
    earlier = (folder / "best.pt").read_bytes()
    monkeypatch.setattr(torch, "save", disk_full_after(1000))
    with pytest.raises(UserError) as caught:
        save_checkpoint(folder / "best.pt", {"model": {"weight": torch.zeros(250_000)}})
    assert re.fullmatch(
        rf"cannot write {re.escape(str(folder / 'best.pt'))}: no space left on the device \([\d.]+ [kMGT]?B free in "
        rf"{re.escape(str(folder))}, a checkpoint needs about 1\.0 MB\): free some space or set train\.save_path; "
        r"the earlier checkpoints are intact",
        str(caught.value),
    ), str(caught.value)
    assert sorted(path.name for path in folder.iterdir()) == ["best.pt"]
    assert (folder / "best.pt").read_bytes() == earlier


def test_metrics_csv_on_a_full_disk_is_one_line_and_the_earlier_file_stays(tmp_path, monkeypatch):
    path = tmp_path / "metrics.csv"
    write_metrics(path, [{"epoch": 1, "step": 4, "train_loss": 0.5}])
    earlier = path.read_bytes()

    def write_bytes(self, data):
        with self.open("wb") as file:
            file.write(data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(UserError, match=r"^cannot write .*metrics\.csv: no space left on the device \(.* free in .*, "):
        write_metrics(path, [{"epoch": 1, "step": 4, "train_loss": 0.5}, {"epoch": 2, "step": 8, "train_loss": 0.4}])
    assert path.read_bytes() == earlier and sorted(tmp_path.iterdir()) == [path]


def test_a_failed_write_names_its_cause_only_where_it_is_a_want_of_room(tmp_path):
    full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    full.__context__ = OSError(errno.EFBIG, "File too large")
    assert no_room_reason(full, tmp_path, 10) == errno.EFBIG  # torch.save's zip writer hides the OSError so
    assert no_room_reason(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path, 10) == errno.EDQUOT
    assert no_room_reason(RuntimeError("unexpected pos 704 vs 598"), tmp_path, 10) is None  # room enough
    assert no_room_reason(RuntimeError("unexpected pos 704 vs 598"), tmp_path, 2**70) == errno.ENOSPC
    assert no_room_reason(PermissionError(errno.EACCES, "Permission denied"), tmp_path, 2**70) is None


FILE_SIZE_LIMIT = """
import resource, signal, sys
from pathlib import Path
import torch
from segmentation.checkpoints import save_checkpoint
from segmentation.config import UserError
from segmentation.console import report_error

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    save_checkpoint(Path(sys.argv[1]), {"model": {"weight": torch.zeros(250_000)}})
except UserError as error:
    sys.exit(report_error(error))
"""


@pytest.mark.slow
def test_a_write_past_the_file_size_limit_is_one_line_for_real(tmp_path):
    folder = tmp_path / "weights" / "run"
    folder.mkdir(parents=True)
    save_checkpoint(folder / "best.pt", {"model": {"weight": torch.zeros(10)}})
    earlier = (folder / "best.pt").read_bytes()
    done = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT, str(folder / "best.pt")], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert re.fullmatch(
        rf"error: cannot write {re.escape(str(folder / 'best.pt'))}: the file would pass this process's file-size "
        rf"limit \([\d.]+ [kMGT]?B free in {re.escape(str(folder))}, a checkpoint needs about 1\.0 MB\): raise the "
        r"limit \(ulimit -f\) or set train\.save_path; the earlier checkpoints are intact\n",
        done.stderr,
    ), done.stderr
    assert sorted(path.name for path in folder.iterdir()) == ["best.pt"]
    assert (folder / "best.pt").read_bytes() == earlier
