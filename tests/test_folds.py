"""Cross-validation: train.folds / train.fold, every fold trained in turn and resumed, the split checked on
resume, and test.py's summary over runs (checked with NumPy and the statistics module)."""

import statistics
from pathlib import Path

import numpy as np
import pytest
import skimage.io
import test_script
import torch

import training
from dataset import fold_indices
from segmentation.config import UserError, load_config, resolve
from segmentation.data.synthetic import synthetic_em_set
from segmentation.engine.checkpoint import load_checkpoint
from tests.helpers import datasets_of

NAMES = [f"slice{index:02d}.png" for index in range(6)]


def folder_config(root, *overrides):
    return load_config(
        None,
        [
            "unet.input_channels=[4, 8]",
            "train.tile_size=60",
            "train.batch_size=2",
            "train.samples_per_image=2",
            "train.device=cpu",
            "predict.tile_size=100",
            "train.dataset_name=folder",
            f"train.data={root}",
            f"train.save_path={root / 'weights'}",
            f"train.log_path={root / 'logs'}",
            *overrides,
        ],
    )


@pytest.fixture
def image_folder(tmp_path):
    """Six synthetic EM slices as files, slice00..slice05, with 0/255 masks."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for index, (image, label, _) in enumerate(synthetic_em_set(6, 80, seed=3)):
        skimage.io.imsave(tmp_path / "images" / NAMES[index], (image * 255).astype(np.uint8), check_contrast=False)
        skimage.io.imsave(tmp_path / "masks" / NAMES[index], label * 255, check_contrast=False)
    return tmp_path


@pytest.mark.parametrize("count, folds", [(5, 5), (6, 4), (30, 5), (171, 5), (7, 2)])
def test_folds_partition_every_image_into_near_equal_parts(count, folds):
    for order in ("random", "contiguous"):
        parts = [fold_indices(count, folds, fold, order, seed=0) for fold in range(folds)]
        assert sorted(i for part in parts for i in part) == list(range(count))  # each image in exactly one fold
        sizes = [len(part) for part in parts]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == count
        if order == "contiguous":
            assert all(part == list(range(part[0], part[-1] + 1)) for part in parts)
    assert fold_indices(30, 5, 0, "contiguous", 0) == [0, 1, 2, 3, 4, 5]  # ISBI: the first 6 slices
    assert fold_indices(30, 5, 4, "contiguous", 0) == [24, 25, 26, 27, 28, 29]


def check_resume(path, config) -> dict:
    """``load_checkpoint`` of ``path`` for a run of ``config``."""
    return load_checkpoint(path, config.unet, config.train)


def test_random_folds_follow_the_seed():
    assert fold_indices(30, 5, 2, "random", seed=0) == fold_indices(30, 5, 2, "random", seed=0)
    assert fold_indices(30, 5, 2, "random", seed=0) != fold_indices(30, 5, 2, "random", seed=1)
    assert fold_indices(30, 5, 2, "random", seed=0) != list(range(12, 18))


def test_split_seed_holds_out_the_same_images_under_every_train_seed(image_folder):
    def split(*overrides):
        data = datasets_of(
            folder_config(image_folder, "train.folds=3", "train.fold=1", "train.val_fraction=0.25", *overrides),
            lambda message: None,
        )
        return data.test.names, data.val.names

    assert fold_indices(6, 3, 1, "random", seed=0) != fold_indices(
        6, 3, 1, "random", seed=1
    )  # so that the seeds below draw other folds
    assert split("train.seed=1") != split("train.seed=0")
    assert split("train.seed=1", "train.split_seed=0") == split("train.seed=0")  # the same test and validation images
    assert split("train.seed=0", "train.split_seed=1") == split("train.seed=1")
    assert split("train.seed=0")[0] == [NAMES[i] for i in fold_indices(6, 3, 1, "random", seed=0)]


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


def test_each_fold_holds_out_its_images_from_training_and_validation(image_folder):
    test_names = []
    for fold in range(3):
        data = datasets_of(
            folder_config(
                image_folder,
                "train.folds=3",
                f"train.fold={fold}",
                "train.fold_order=contiguous",
                "train.val_fraction=0.25",
            ),
            lambda message: None,
        )
        assert data.test.names == NAMES[2 * fold : 2 * fold + 2]
        assert len(data.val) == 1 and data.val.names[0] not in data.test.names
        assert len(data.train) == 3 * 2  # the 3 images left, 2 tiles each
        test_names += data.test.names
    assert sorted(test_names) == NAMES


def test_contradictory_fold_settings_are_one_line_each(image_folder):
    with pytest.raises(
        UserError,
        match=r"train.test_images: train.folds chooses the test images of each fold; set train.test_images=null",
    ):
        folder_config(image_folder, "train.folds=3", "train.test_images=[1]")
    with pytest.raises(UserError, match=r"train.val_images: train.folds chooses"):
        folder_config(image_folder, "train.folds=3", "train.val_images=[1]")
    with pytest.raises(UserError, match=r"train.fold: 3 is not among the 3 folds \(0..2, or all\)"):
        folder_config(image_folder, "train.folds=3", "train.fold=3")
    with pytest.raises(UserError, match=r"train.fold: 1 needs train.folds"):
        folder_config(image_folder, "train.fold=1")
    with pytest.raises(UserError, match=r"train.fold: expected an integer or all, got 'every'"):
        folder_config(image_folder, "train.folds=3", "train.fold=every")
    with pytest.raises(UserError, match=r"train.resume: with train.fold=all .* use train.resume=auto"):
        folder_config(image_folder, "train.folds=3", "train.fold=all", "train.resume=weights/x/last.pt")
    with pytest.raises(UserError, match=r"train.folds: 7 folds need at least 7 images, found 6"):
        datasets_of(folder_config(image_folder, "train.folds=7"), lambda message: None)


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


def every_fold_arguments(image_folder: Path) -> list[str]:
    """training.py overrides for train.fold=all over 3 folds of the test images, with a tiny model."""
    return [
        "train.dataset_name=folder",
        f"train.data={image_folder}",
        "unet.input_channels=[4, 8]",
        "train.tile_size=60",
        "train.batch_size=2",
        "train.samples_per_image=2",
        "train.device=cpu",
        "predict.tile_size=100",
        f"train.save_path={image_folder / 'weights'}",
        f"train.log_path={image_folder / 'logs'}",
        "train.folds=3",
        "train.fold=all",
        "train.val_fraction=0.25",
        "train.warmup_epochs=0",
    ]


def test_every_fold_trains_resumes_and_test_py_summarizes_them(image_folder, capsys):
    arguments = every_fold_arguments(image_folder)
    assert training.main([*arguments, "train.max_epochs=1", "train.run_name=cv"]) == 0
    printed = capsys.readouterr().out
    best = [image_folder / "weights" / f"cv-fold{fold}" / "best.pt" for fold in range(3)]
    assert printed.splitlines()[-1] == "python test.py --checkpoint " + " ".join(map(str, best))
    test_names = {}
    for fold, path in enumerate(best):
        state = torch.load(path, weights_only=True)
        assert state["config"]["train"]["fold"] == fold and state["progress"]["epoch"] == 1
        test_names[fold] = datasets_of(resolve(state["config"])).test.names
    assert sorted(sum(test_names.values(), [])) == NAMES

    # resume=auto continues the newest series: each fold from its last.pt, in its own folder
    assert training.main([*arguments, "train.max_epochs=2", "train.resume=auto"]) == 0
    assert sorted(path.name for path in (image_folder / "weights").iterdir()) == ["cv-fold0", "cv-fold1", "cv-fold2"]
    assert [torch.load(path.with_name("last.pt"), weights_only=True)["progress"]["epoch"] for path in best] == [2, 2, 2]
    capsys.readouterr()
    assert training.main([*arguments, "train.max_epochs=2", "train.resume=auto"]) == 0
    assert capsys.readouterr().err.count("has finished its 2 epochs; skipping it") == 3

    # test.py scores each fold on its own test images, then the mean and sample standard deviation;
    # an override after the checkpoints is an override, not a path
    assert (
        test_script.main(
            ["--checkpoint", *map(str, best), "train.device=cpu", "--output", str(image_folder / "scores")]
        )
        == 0
    )
    printed = capsys.readouterr().out
    per_fold = [
        [float(value) for value in line.split()[1:]] for line in printed.splitlines() if line.split()[:1] == ["all"]
    ]
    rows = {
        line.split()[0]: [float(value) for value in line.split()[1:]]
        for line in printed.splitlines()
        if line.split()[:1] and line.split()[0] in ("cv-fold0", "cv-fold1", "cv-fold2", "mean", "std")
    }
    assert len(per_fold) == 3 and [rows[f"cv-fold{fold}"] for fold in range(3)] == per_fold
    for column in range(len(per_fold[0])):
        values = [row[column] for row in per_fold]
        assert rows["mean"][column] == pytest.approx(statistics.mean(values), abs=1.1e-4)  # both rounded to 4 decimals
        assert rows["std"][column] == pytest.approx(statistics.stdev(values), abs=2e-4)
    for fold in range(3):  # each fold's masks are those of its own test images
        assert (
            sorted(path.name for path in (image_folder / "scores" / f"cv-fold{fold}" / "masks").glob("*.png"))
            == test_names[fold]
        )
    capsys.readouterr()
    assert test_script.main(["--checkpoint", *map(str, best), "--input", str(image_folder / "images")]) == 1
    assert "--input and --export take one" in capsys.readouterr().err


def test_every_fold_skips_folds_that_early_stopping_ended(image_folder, capsys, monkeypatch):
    # a validation loss that never improves: each fold stops after epoch 2 of 4 (patience 1)
    monkeypatch.setattr(
        training, "evaluate", lambda *args: {"val_loss": 1.0, "val_pixel_error": 0.1, "val_dice": 0.9, "val_iou": 0.8}
    )
    arguments = [
        *every_fold_arguments(image_folder),
        "train.max_epochs=4",
        "train.early_stopping=1",
        "train.best_metric=val_loss",
        "train.run_name=es",
    ]
    assert training.main(arguments) == 0
    last = [image_folder / "weights" / f"es-fold{fold}" / "last.pt" for fold in range(3)]
    assert [torch.load(path, weights_only=True)["progress"]["epoch"] for path in last] == [2, 2, 2]
    capsys.readouterr()
    assert training.main([*arguments, "train.resume=auto"]) == 0
    assert capsys.readouterr().err.count("ended by early stopping; skipping it") == 3
    assert [torch.load(path, weights_only=True)["progress"]["epoch"] for path in last] == [2, 2, 2]
    # without early stopping now, the same runs continue to max_epochs
    assert (
        training.main(
            [
                *every_fold_arguments(image_folder),
                "train.max_epochs=4",
                "train.best_metric=val_loss",
                "train.run_name=es",
                "train.resume=auto",
            ]
        )
        == 0
    )
    assert [torch.load(path, weights_only=True)["progress"]["epoch"] for path in last] == [4, 4, 4]
