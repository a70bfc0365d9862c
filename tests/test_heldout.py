"""Held-out test images (train.test_images), the calibrated decision threshold (predict.threshold=auto),
and test.py's masks and scores on the test images, checked with NumPy and scikit-image."""

import numpy as np
import pytest
import skimage.io
import test_script
import torch
from skimage import measure
from skimage.metrics import adapted_rand_error

from dataset import build_datasets
from model import build_model
from segmentation.config import UserError, load_config
from segmentation.data.synthetic import synthetic_em_set
from segmentation.inference.infer import calibrate_threshold, predict_probabilities, separate_cells
from tests.helpers import datasets_of
from training import train


def folder_config(root, *overrides):
    return load_config(
        None,
        [
            "unet.input_channels=[4, 8]",
            "train.tile_size=60",
            "train.batch_size=2",
            "train.device=cpu",
            "predict.tile_size=100",
            "train.dataset_name=folder",
            f"train.data={root}",
            f"train.save_path={root / 'weights'}",
            f"train.log_path={root / 'logs'}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Six synthetic EM slices as files, slice00..slice05, with 0/255 masks."""
    root = tmp_path_factory.mktemp("heldout")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for index, (image, label, _) in enumerate(synthetic_em_set(6, 80, seed=3)):
        skimage.io.imsave(
            root / "images" / f"slice{index:02d}.png", (image * 255).astype(np.uint8), check_contrast=False
        )
        skimage.io.imsave(root / "masks" / f"slice{index:02d}.png", label * 255, check_contrast=False)
    return root


def test_test_images_are_held_out_of_training_and_validation(image_folder):
    data = datasets_of(
        folder_config(image_folder, "train.val_images=[3]", "train.test_images=[5, 4]"), lambda message: None
    )
    assert data.test.names == ["slice04.png", "slice05.png"]
    assert data.val.names == ["slice03.png"]
    assert len(data.train) == 3 * 4  # slices 0-2, 4 tiles each
    assert datasets_of(folder_config(image_folder), lambda message: None).test is None
    with pytest.raises(UserError, match=r"share \[4\]"):
        datasets_of(folder_config(image_folder, "train.val_images=[4]", "train.test_images=[4]"), lambda message: None)
    with pytest.raises(UserError, match=r"train.test_images: \[9\] not among the 6 images"):
        datasets_of(folder_config(image_folder, "train.test_images=[9]"), lambda message: None)
    # with a fraction, validation is drawn from the images left after the test images
    data = datasets_of(
        folder_config(image_folder, "train.val_fraction=0.25", "train.test_images=[0, 1]"), lambda message: None
    )
    assert len(data.val) == 1 and data.val.names[0] not in ("slice00.png", "slice01.png")


def test_calibrate_threshold_against_a_hand_computation():
    generator = np.random.default_rng(0)
    probability = generator.random((2, 40, 40))
    labels = [(p >= 0.3).astype(np.int64) for p in probability]  # a perfect prediction at threshold 0.3
    threshold, table = calibrate_threshold(list(probability), labels, "pixel_error")
    assert threshold == pytest.approx(0.3)
    for row in table:
        wrong = sum(np.count_nonzero((p >= row["threshold"]) != (label == 1)) for p, label in zip(probability, labels))
        assert row["pixel_error"] == pytest.approx(wrong / probability.size)
        expected = np.mean(
            [
                adapted_rand_error(
                    measure.label(label == 1, connectivity=1),
                    measure.label(p >= row["threshold"], connectivity=1),
                    ignore_labels=(0,),
                )[0]
                for p, label in zip(probability, labels)
            ]
        )
        assert row["rand_error"] == pytest.approx(expected)
    assert table[[row["threshold"] for row in table].index(0.3)]["rand_error"] == pytest.approx(0.0)
    assert calibrate_threshold(list(probability), labels, "dice")[0] == pytest.approx(0.3)


def test_separate_cells_cuts_a_thin_bridge_and_keeps_unseeded_cells():
    # two cells (probability peaks) joined by a 2-px bridge where the membrane has a gap, and a third,
    # faint cell with no seed
    y, x = np.mgrid[0:40, 0:60]
    probability = np.maximum(
        np.exp(-((y - 20) ** 2 + (x - 15) ** 2) / 60), np.exp(-((y - 20) ** 2 + (x - 40) ** 2) / 60)
    )
    cells = probability >= 0.3
    cells[19:21, 15:41] = True
    probability[19:21, 15:41] = np.maximum(probability[19:21, 15:41], 0.35)
    cells[2:6, 52:58] = True  # the faint cell
    probability[2:6, 52:58] = 0.4
    assert measure.label(cells, connectivity=1).max() == 2
    separated = separate_cells(cells, probability, seed_threshold=0.9)
    assert not np.any(separated & ~cells)
    components = measure.label(separated, connectivity=1)
    assert components.max() == 3
    assert components[20, 15] != components[20, 40]
    assert np.count_nonzero(cells & ~separated) <= 2 * 40  # a 1-px line, no more
    assert np.array_equal(separated[2:6, 52:58], cells[2:6, 52:58])


def test_separate_cells_ignores_seeds_smaller_than_min_seed_area():
    # one cell: a large sure centre, and a 3x3 island of high probability behind a dip (an organelle);
    # a second cell whose only sure pixels are a 2x2 island
    probability = np.full((30, 60), 0.8)
    probability[:, 28:32] = 0.0  # a membrane between the two cells
    probability[5:20, 3:18] = 0.99  # 225 px seed
    probability[20:25, 19:26] = 0.7  # the dip around the island
    probability[21:24, 21:24] = 0.99  # 9 px island
    probability[10:12, 40:42] = 0.99  # 4 px, the second cell's only seed
    cells = probability >= 0.5
    assert measure.label(cells, connectivity=1).max() == 2
    split = separate_cells(cells, probability, seed_threshold=0.95)
    assert measure.label(split, connectivity=1).max() == 3  # every island seeds its own piece
    whole = separate_cells(cells, probability, seed_threshold=0.95, min_seed_area=10)
    assert np.array_equal(whole, cells)  # the island floods from the big seed; the seedless cell stays whole
    assert np.array_equal(separate_cells(cells, probability, seed_threshold=0.95, min_seed_area=9), split)


def test_training_calibrates_the_threshold_and_test_py_scores_its_masks(image_folder, tmp_path, capsys):
    config = folder_config(
        image_folder,
        "train.val_images=[3]",
        "train.test_images=[4, 5]",
        "train.max_epochs=3",
        "predict.threshold=auto",
        "train.best_metric=val_pixel_error",
    )
    summary = train(config)
    best = summary["run_weights"] / "best.pt"
    state = torch.load(best, weights_only=True)
    threshold = state["threshold"]
    assert 0.05 <= threshold <= 0.95

    # the stored threshold has the lowest pixel error on the validation image, counted here with NumPy
    model = build_model(config.unet)
    model.load_state_dict(state["model"])
    image, label, _ = build_datasets(config.unet, config.train, lambda message: None).val[0]
    probability = predict_probabilities(model, image, 100)[1].numpy()
    errors = {
        row["threshold"]: np.mean((probability >= row["threshold"]) != (label.numpy() == 1))
        for row in state["threshold_table"]
    }
    assert errors[threshold] == pytest.approx(min(errors.values()))

    capsys.readouterr()
    assert test_script.main(["--checkpoint", str(best), "--output", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert f"2 test images, class 1 at probability >= {threshold:.2f}" in printed
    wrong = total = 0
    rand_errors = []
    test_images = build_datasets(config.unet, config.train, lambda message: None).test
    for index, name in enumerate(("slice04", "slice05")):
        truth = skimage.io.imread(image_folder / "masks" / f"{name}.png")
        written = skimage.io.imread(tmp_path / "masks" / f"{name}.png")
        probability = predict_probabilities(model, test_images[index][0], 100)[1].numpy()
        np.testing.assert_array_equal(written, np.where(probability >= threshold, 255, 0))
        wrong += np.count_nonzero(written != truth)
        total += truth.size
        rand_errors.append(
            adapted_rand_error(
                measure.label(truth == 255, connectivity=1),
                measure.label(written == 255, connectivity=1),
                ignore_labels=(0,),
            )[0]
        )
    overall = next(line for line in printed.splitlines() if line.split()[:1] == ["all"]).split()
    assert float(overall[1]) == pytest.approx(wrong / total, abs=1e-4)
    assert float(overall[4]) == pytest.approx(np.mean(rand_errors), abs=1e-4)
