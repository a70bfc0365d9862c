"""segmentation.runs.tensorboard: the events of train.tensorboard read back with TensorBoard's own reader; a resumed
run continues its log without doubles; a missing package is one line."""

import csv
import shutil
import sys

import pytest

from segmentation.config import UserError
from segmentation.runs.tensorboard import require_tensorboard
from tests.helpers import datasets_of, tiny_config
from training import train

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_events(run_log):
    """TensorBoard's own reader over the run's event files, keeping every event."""
    reader = event_accumulator.EventAccumulator(
        str(run_log / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0}
    )
    reader.Reload()
    return reader


def scalars(reader, tag: str) -> dict[int, float]:
    """``{step: value}`` of a scalar tag; a step written twice fails (a resumed run must not double its epochs)."""
    events = reader.Scalars(tag)
    assert len({event.step for event in events}) == len(events), f"{tag}: a step written twice"
    return {event.step: event.value for event in events}


@pytest.mark.slow
def test_the_epochs_scalars_settings_and_validation_images_are_in_the_events(tmp_path):
    summary = train(tiny_config(tmp_path, "train.max_epochs=2", "train.tensorboard=true", "train.lr=0.002"))
    reader = read_events(summary.folders.log)
    with (summary.folders.log / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    columns = {
        "loss/train": "train_loss",
        "loss/validation": "val_loss",
        "validation/pixel_error": "val_pixel_error",
        "validation/dice": "val_dice",
        "validation/iou": "val_iou",
        "validation/rand_error": "val_rand_error",
        "validation/vi": "val_vi",
        "optimisation/lr": "lr",
        "speed/images_per_second": "images_per_second",
    }
    assert set(columns) <= set(reader.Tags()["scalars"])
    for tag, column in columns.items():  # the same numbers as metrics.csv, in float32
        expected = {int(row["epoch"]): float(row[column]) for row in rows}
        assert scalars(reader, tag) == pytest.approx(expected, rel=1e-6), tag
    images = sorted(tag for tag in reader.Tags()["images"] if tag.startswith("validation/"))
    validation = datasets_of(tiny_config(tmp_path)).val.names
    assert len(validation) == 2 and images == sorted(f"validation/{name}" for name in validation)
    picture = reader.Images(images[0])
    assert [event.step for event in picture] == [1, 2] and (picture[0].width, picture[0].height) == (3 * 64 + 8, 64)
    hparams_plugin = pytest.importorskip("tensorboard.plugins.hparams.plugin_data_pb2")
    content = reader.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    settings = hparams_plugin.HParamsPluginData.FromString(content).session_start_info.hparams
    assert settings["train.lr"].number_value == pytest.approx(0.002) and settings["unet.norm"].string_value == "batch"
    assert settings["unet.input_channels"].string_value == "[4, 8]"


@pytest.mark.slow
def test_a_resumed_run_continues_its_event_log_at_the_next_epoch(tmp_path):
    overrides = ["train.tensorboard=true", "train.run_name=resumed"]
    first = train(tiny_config(tmp_path, "train.max_epochs=1", *overrides))
    after_one = tmp_path / "after_one.pt"
    shutil.copy(first.folders.weights / "last.pt", after_one)
    train(tiny_config(tmp_path, "train.max_epochs=2", "train.resume=auto", *overrides))
    # as if the run had been killed after writing epoch 2's events but before saving its last.pt
    shutil.copy(after_one, first.folders.weights / "last.pt")
    last = train(tiny_config(tmp_path, "train.max_epochs=3", "train.resume=auto", *overrides))
    reader = read_events(first.folders.log)
    assert sorted(scalars(reader, "loss/train")) == [1, 2, 3]  # each epoch once: the stale epoch 2 is hidden
    with (last.folders.log / "metrics.csv").open() as file:
        logged = {int(row["epoch"]): float(row["train_loss"]) for row in csv.DictReader(file)}
    assert scalars(reader, "loss/train") == pytest.approx(logged, rel=1e-6)


def test_a_missing_tensorboard_package_is_one_line_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(
        UserError, match=r"^train.tensorboard: true needs the tensorboard package: pip install tensorboard$"
    ):
        require_tensorboard()
    with pytest.raises(UserError, match="pip install tensorboard"):
        train(tiny_config(tmp_path / "run", "train.tensorboard=true"))
    assert not (tmp_path / "run").exists()
