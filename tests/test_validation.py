"""segmentation.engine.validation: scores of whole validation images, and the threshold calibrated on them and
stored for test.py."""

import numpy as np
import pytest
import skimage.io
import test_script
import torch

from dataset import WholeImageDataset
from losses import IGNORE_LABEL
from model import build_model
from segmentation.data.cache import write_entry
from segmentation.engine.validation import evaluate
from segmentation.inference.infer import predict_probabilities
from tests.helpers import (
    datasets_of,
    folder_config,
    predictor_of,
    tiny_config,
)
from training import train


@pytest.mark.slow
def test_training_calibrates_the_threshold_and_test_py_decides_with_it(image_folder, tmp_path, capsys):
    config = folder_config(
        image_folder,
        "train.val_images=[3]",
        "train.test_images=[4, 5]",
        "train.max_epochs=3",
        "predict.threshold=auto",
        "train.best_metric=val_pixel_error",
    )
    summary = train(config)
    best = summary.folders.weights / "best.pt"
    state = torch.load(best, weights_only=True)
    threshold = state["plan"]["threshold"]
    assert 0.05 <= threshold <= 0.95 and state["plan"]["threshold_source"] == "calibrated"

    # the stored threshold has the lowest pixel error on the validation image, counted here with NumPy
    model = build_model(config.unet, state["plan"]["boundary_class"])
    model.load_state_dict(state["model"])
    image, label, _ = datasets_of(config, lambda message: None).val[0]
    probability = predict_probabilities(model, image, 100)[1].numpy()
    errors = {
        row["threshold"]: np.mean((probability >= row["threshold"]) != (label.numpy() == 1))
        for row in state["threshold_table"]
    }
    assert errors[threshold] == pytest.approx(min(errors.values()))

    # test.py decides the held-out images' pixels at the stored threshold (the scores of its masks: test_test.py)
    capsys.readouterr()
    assert test_script.main(["--checkpoint", str(best), "--output", str(tmp_path)]) == 0
    assert f"2 test images, class 1 at probability >= {threshold:.2f}" in capsys.readouterr().out
    test_images = datasets_of(config, lambda message: None).test
    for index, name in enumerate(("slice04", "slice05")):
        written = skimage.io.imread(tmp_path / "masks" / f"{name}.png")
        probability = predict_probabilities(model, test_images[index][0], 100)[1].numpy()
        np.testing.assert_array_equal(written, np.where(probability >= threshold, 255, 0))


def test_evaluate_counts_the_images_predicted_as_one_class(tmp_path):
    config = tiny_config(tmp_path)
    data = datasets_of(config, lambda message: None)
    model = build_model(config.unet)
    assert evaluate(predictor_of(model, config), data.val, config.train.loss).uniform_images in (0, 1, 2)
    with torch.no_grad():
        model.outc.bias.copy_(torch.tensor([-50.0, 50.0]))  # class 1 everywhere
    assert evaluate(predictor_of(model, config), data.val, config.train.loss).uniform_images == len(data.val) == 2


def test_validation_scores_the_annotated_pixels_alone(tmp_path):
    config = tiny_config(tmp_path)
    model = build_model(config.unet)
    rng = np.random.default_rng(2)
    entries = []
    for index in range(2):
        label = (rng.random((40, 44)) < 0.6).astype(np.uint8)
        label[:, 25:] = IGNORE_LABEL
        image = rng.standard_normal((1, 40, 44)).astype(np.float32)
        entries.append(write_entry(tmp_path / f"e{index}", f"e{index}", image, label, None, 1, 2))
    dataset = WholeImageDataset(entries, None)
    predictor = predictor_of(model, config)
    result = evaluate(predictor, dataset, "ce")
    wrong = total = 0
    for image, label, _ in dataset:  # by hand: the predicted classes against the annotated labels
        classes = predictor.classes(predictor.probabilities(image)).numpy()
        given = label.numpy() != IGNORE_LABEL
        wrong += np.count_nonzero(classes[given] != label.numpy()[given])
        total += np.count_nonzero(given)
    assert total == 2 * 40 * 25 and result.scores["pixel_error"] == pytest.approx(wrong / total)
