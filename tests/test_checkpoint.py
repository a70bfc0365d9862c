"""segmentation.engine.resume and segmentation.checkpoints: a run resumes only on the split and architecture it
trained on; checkpoints of earlier versions load, resume and predict."""

import dataclasses
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import training
from model import UNet, build_model
from segmentation.checkpoints import Progress
from segmentation.config import UserError, architecture_differences, load_config
from segmentation.engine.resume import (
    FIRST_CONVOLUTION,
    load_checkpoint,
    load_initial_weights,
    read_initial_weights,
)
from segmentation.inference.objects import ObjectRules
from segmentation.inference.trained import load_trained
from tests.helpers import folder_config, plan_of, tiny_config
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
