"""segmentation.plan: every auto decided once from the data, with no auto left; stored in checkpoints and plan.json,
read back (an edited plan refused in one line), kept by a resumed run, and the predict settings in force on top."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from segmentation.config import UserError
from segmentation.plan import Plan, decide_plan, ignore_problem, learnt_min_object_size, reading_problem
from tests.helpers import make_id_folder, plain_folder_config, planned_data, tiny_config
from training import train


def entry(read_as: str, counts: tuple[int, ...], areas: tuple[int, ...] = (), name: str = "image") -> SimpleNamespace:
    """A cache entry as the plan reads it: how its mask was read, its class counts and whole objects' areas."""
    return SimpleNamespace(mask_read_as=read_as, class_counts=counts, object_areas=areas, name=name)


def test_the_learnt_size_is_half_the_fifth_percentile_of_whole_objects():
    areas = np.arange(1, 201)  # 1..200 px
    assert learnt_min_object_size(areas) == int(0.5 * np.percentile(areas, 5))  # 0.5 * 10.95 -> 5
    assert learnt_min_object_size(np.array([], dtype=np.int64)) == 0


@pytest.mark.parametrize(
    ("size", "fill", "reading", "expected"),
    [
        ("auto", "auto", "instances", (12, True)),
        ("auto", "auto", "classes", (0, False)),  # class masks: objects as predicted
        (30, "auto", "classes", (30, False)),  # asked for: applies to class masks too
        ("auto", "false", "instances", (12, False)),
        (0, "true", "instances", (0, True)),
    ],
)
def test_auto_cleans_objects_only_for_masks_of_object_ids(tmp_path, size, fill, reading, expected):
    config = tiny_config(tmp_path, f"predict.min_object_size={size}", f"predict.fill_holes={fill}")
    # whole objects of 24..44 px: the 5th percentile is 25, half of it 12
    images = [entry(reading, (60, 30, 10), tuple(range(24, 45)))]
    plan = decide_plan(config.unet, config.data, config.predict, images, lambda message: None)
    assert (plan.min_object_size, plan.fill_holes) == expected and plan.learnt_object_size == 12


def test_the_plan_decides_every_auto_from_the_data(tmp_path):
    notes = []
    config = tiny_config(tmp_path, "train.tile_size=auto", "predict.threshold=auto")
    ids = [entry("instances", (700, 200, 100), (40, 50)), entry("instances", (300, 100, 100), (60,))]
    plan = decide_plan(config.unet, config.data, config.predict, ids, notes.append)
    # object ids of two classes: their borders are a third class, weighted by the inverse frequency
    assert plan.boundary_class and plan.label_classes == 3 and plan.mask_reading == "instances"
    counts = np.array([1000, 300, 200])
    by_hand = 1 / (3 * counts / counts.sum())  # w_c = 1 / (classes seen x frequency): mean weight 1 over pixels
    np.testing.assert_allclose(plan.class_weights, by_hand, rtol=1e-6)
    # depth 2, valid convolutions: 256 is valid (by hand: 256-4=252, /2-4=122, /2-4=57, x2-4=110, x2-4=216)
    assert (plan.tile_size, plan.output_size) == (256, 216) and plan.predict_tile_size == 572
    assert notes == [
        "train.tile_size auto: 256 px, the valid input nearest 256 px (a sensible side) for depth 2 and padding 0"
    ]
    assert (plan.threshold, plan.threshold_source) == (0.5, "uncalibrated")
    assert "auto" not in json.dumps(plan.to_dict())
    classes = decide_plan(config.unet, config.data, config.predict, [entry("classes", (70, 30))], notes.append)
    assert not classes.boundary_class and classes.label_classes == 2 and len(classes.class_weights) == 2
    unweighted = tiny_config(tmp_path, "train.class_weights=none", "unet.boundary_class=false")
    plain = decide_plan(unweighted.unet, unweighted.data, unweighted.predict, ids, notes.append)
    assert plain.class_weights is None and not plain.boundary_class and plain.mask_reading == "instances"


def test_a_stored_plan_reads_back_and_an_edited_one_is_refused_in_one_line(tmp_path):
    config = tiny_config(tmp_path)
    plan = decide_plan(config.unet, config.data, config.predict, [entry("classes", (70, 30))], lambda message: None)
    stored = json.loads(json.dumps(plan.to_dict()))
    assert Plan.from_dict(stored, "best.pt") == plan
    edits = {
        "a key gone": {key: value for key, value in stored.items() if key != "tile_size"},
        "a key added": {**stored, "tiles": 3},
        "a threshold of 2": {**stored, "threshold": 2.0},
        "weights for three classes": {**stored, "class_weights": [1.0, 1.0, 1.0]},
        "a newer version": {**stored, "version": 99},
        "not a mapping": [1, 2],
    }
    for what, data in edits.items():
        with pytest.raises(UserError, match="^best.pt: ") as caught:
            Plan.from_dict(data, "best.pt")
        assert "\n" not in str(caught.value), what


def test_masks_that_read_otherwise_than_the_plan_recorded_are_named():
    config = tiny_config(Path("."))
    plan = decide_plan(config.unet, config.data, config.predict, [entry("instances", (5, 4, 1))], lambda _: None)
    assert reading_problem(plan, [entry("instances", (9, 1, 0))]) is None
    problem = reading_problem(plan, [entry("classes", (9, 1))])
    assert problem == (
        "its run read the training masks as instances, they now read as classes: set train.mask_type as the run had it"
    )


def test_the_predict_settings_in_force_go_on_top_of_the_plan(tmp_path):
    config = tiny_config(tmp_path)
    plan = dataclasses.replace(
        decide_plan(config.unet, config.data, config.predict, [entry("instances", (70, 20, 10), (30,))], print),
        threshold=0.3,
        threshold_source="calibrated",
    )
    auto = tiny_config(tmp_path, "predict.threshold=auto", "predict.tile_size=auto").predict
    assert plan.for_prediction(auto) == plan  # auto keeps every decision
    given = tiny_config(
        tmp_path,
        "predict.threshold=0.7",
        "predict.min_object_size=5",
        "predict.fill_holes=false",
        "predict.tile_size=100",
    ).predict
    overridden = plan.for_prediction(given)
    assert (overridden.threshold, overridden.threshold_source) == (0.7, "set")
    assert (overridden.min_object_size, overridden.fill_holes, overridden.predict_tile_size) == (5, False, 100)


@pytest.mark.slow
def test_a_run_stores_its_plan_once_and_a_resumed_run_keeps_it(tmp_path):
    make_id_folder(tmp_path / "data", count=6, size=64)
    overrides = ["train.val_images=[4]", "train.test_images=[5]", "train.run_name=ids", "predict.threshold=auto"]
    overrides += ["unet.input_channels=[4, 8]", "train.tile_size=60", "train.batch_size=2", "train.device=cpu"]
    overrides += [f"train.save_path={tmp_path / 'weights'}", f"train.log_path={tmp_path / 'logs'}"]
    first = train(plain_folder_config(tmp_path / "data", "train.max_epochs=1", *overrides))
    last = torch.load(first.folders.weights / "last.pt", weights_only=True)
    best = torch.load(first.folders.weights / "best.pt", weights_only=True)
    written = json.loads((first.folders.log / "plan.json").read_text())
    # plan.json has the calibrated plan of best.pt; last.pt the plan before calibration
    assert written == best["plan"] and best["plan"]["threshold_source"] == "calibrated"
    assert last["plan"] == {**best["plan"], "threshold": 0.5, "threshold_source": "uncalibrated"}
    assert last["config"]["unet"]["boundary_class"] == "auto" and last["plan"]["boundary_class"] is True
    # new training images would weigh the classes otherwise: the resumed run keeps its plan's weights
    make_id_folder(tmp_path / "more", count=3, size=96, seed=9)
    for path in (tmp_path / "more").rglob("n*.*"):
        path.rename(tmp_path / "data" / path.parent.name / f"x{path.name}")
    fresh_plan, _ = planned_data(plain_folder_config(tmp_path / "data", *overrides))
    assert fresh_plan.class_weights != tuple(last["plan"]["class_weights"])
    resumed = train(plain_folder_config(tmp_path / "data", "train.max_epochs=2", "train.resume=auto", *overrides))
    again = torch.load(resumed.folders.weights / "last.pt", weights_only=True)
    assert again["plan"]["class_weights"] == last["plan"]["class_weights"] and resumed.progress.epoch == 2


def test_the_plan_records_the_ignore_value_and_a_resumed_run_must_keep_it(tmp_path):
    config = tiny_config(tmp_path, "train.ignore_value=128")
    images = [entry("classes", (70, 30))]
    plan = decide_plan(config.unet, config.data, config.predict, images, lambda _: None)
    assert plan.sparse and plan.ignore_value == 128.0 and Plan.from_dict(plan.to_dict(), "p") == plan
    assert ignore_problem(plan, config.data) is None
    assert "its run set apart the mask value 128.0" in ignore_problem(plan, tiny_config(tmp_path).data)
    # 255 of 0/255 masks set apart: nothing is left of class 1, which is said in one line
    with pytest.raises(UserError, match="no training pixel is of class 1 once the unannotated pixels are set apart"):
        decide_plan(config.unet, config.data, config.predict, [entry("classes", (70, 0))], lambda _: None)
