"""segmentation.engine.checkpoint: a run resumes only on the split and architecture it trained on; checkpoints of
earlier versions load, resume and predict."""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import training
from model import UNet, build_model
from segmentation.config import UserError, architecture_differences, load_config
from segmentation.engine.checkpoint import (
    FIRST_CONVOLUTION,
    decided_object_rules,
    load_checkpoint,
    load_initial_weights,
    load_model,
    read_initial_weights,
)
from segmentation.inference.objects import ObjectRules
from tests.helpers import folder_config, tiny_config
from training import train


def check_resume(path, config) -> dict:
    """``load_checkpoint`` of ``path`` for a run of ``config``."""
    return load_checkpoint(path, config.unet, config.train)


@pytest.mark.slow
def test_resuming_under_another_train_seed_is_refused_only_where_the_split_changes(image_folder):
    last = (
        training.train(folder_config(image_folder, "train.folds=3", "train.fold=0", "train.max_epochs=1"))[
            "run_weights"
        ]
        / "last.pt"
    )
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
    last = training.train(config)["run_weights"] / "last.pt"
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
    """Checkpoints written before the settings were typed (ed6eb72) store every key as plain data, the seed's
    legacy keys as null, and lack keys that came later: test.py loads them and a run resumes from them."""
    summary = train(tiny_config(tmp_path, "train.max_epochs=1", "train.run_name=old"))
    last = summary["run_weights"] / "last.pt"
    state = torch.load(last, weights_only=True)
    state["config"]["unet"].update(use_ln=None, input_shape=None)
    del state["config"]["train"]["split_seed"]
    torch.save(state, last)
    model, config, loaded, _ = load_model(last, None, [])
    assert config.train.effective_split_seed == 0 and config.unet.norm == "batch"
    assert all(torch.equal(tensor, state["model"][name]) for name, tensor in model.state_dict().items())
    resumed = train(tiny_config(tmp_path, "train.max_epochs=2", f"train.resume={last}"))
    assert resumed["run_weights"] == summary["run_weights"] and resumed["epoch"] == 2


def saved_state(model: UNet, widths=(4, 8), classes=2, channels=1) -> dict:
    """What a checkpoint of ``model`` holds that train.init_from reads: weights, settings, progress."""
    settings = load_config(None, [f"unet.input_channels={list(widths)}", f"unet.image_channels={channels}"])
    config = settings.with_values({"unet.num_classes": classes, "train.dataset_name": "folder"}).to_dict()
    return {"model": model.state_dict(), "config": config, "progress": {"epoch": 7}}


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
    source = first["run_weights"] / "best.pt"
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
    assert second["run_weights"].name == "target" and second["epoch"] == 1 and second["step"] == 4  # a fresh count
    last = torch.load(second["run_weights"] / "last.pt", weights_only=True)
    assert last["config"]["train"]["init_from"] == str(source)
    steps = {entry["step"].item() for entry in last["optimizer"]["state"].values()}
    assert steps == {4.0}  # Adam's moments started with this run, not the source's 8 steps
    with pytest.raises(UserError, match="^train.init_from: .*missing.pt: checkpoint not found$"):
        train(tiny_config(tmp_path / "elsewhere", "train.init_from=missing.pt"))
    assert not (tmp_path / "elsewhere").exists()  # nothing written


def test_a_checkpoint_rebuilds_its_boundary_class_and_object_rules(tmp_path):
    config = tiny_config(tmp_path, "unet.boundary_class=true")
    model = build_model(config.unet)
    state = {"model": model.state_dict(), "config": config.to_dict(), "progress": {"epoch": 1}}
    state["objects"] = {"instance_data": True, "learnt_size": 14}
    torch.save(state, tmp_path / "best.pt")
    loaded, loaded_config, loaded_state, _ = load_model(tmp_path / "best.pt", None, [])
    assert loaded.out_channels == 3 and loaded_config.unet.boundary_class is True
    assert decided_object_rules(loaded_config.predict, loaded_state) == ObjectRules(14, True)
    assert decided_object_rules(loaded_config.predict, {}) == ObjectRules()  # before the record: nothing cleaned
    # a checkpoint from before unet.boundary_class has none, whatever the config says now
    old = tiny_config(tmp_path).to_dict()
    del old["unet"]["boundary_class"]
    torch.save(
        {"model": build_model(tiny_config(tmp_path).unet).state_dict(), "config": old, "progress": {}},
        tmp_path / "old.pt",
    )
    assert load_model(tmp_path / "old.pt", None, [])[0].out_channels == 2
    assert (
        architecture_differences(old, load_config(None, ["unet.boundary_class=false"]).unet, ["boundary_class"]) == []
    )
    assert architecture_differences(config.to_dict(), tiny_config(tmp_path).unet) == []  # auto matches either


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
