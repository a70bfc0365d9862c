"""Three classes end to end: the synthetic images with organelles trained, logged and plotted per
class, predicted as index PNGs and scored per class as an independent count says."""

import csv

import numpy as np
import pytest
import skimage.io
import test_script

from segmentation.data.synthetic import SyntheticSample, synthetic_em
from tests.test_training import tiny_config
from training import train


def test_three_synthetic_classes_are_trained_predicted_and_scored_per_class(tmp_path, capsys):
    image, label, _ = synthetic_em(96, np.random.default_rng(0), classes=3)
    assert set(np.unique(label)) == {0, 1, 2} and 0.01 < np.mean(label == 2) < 0.1  # organelles: a rare third class
    summary = train(
        tiny_config(
            tmp_path, "unet.num_classes=3", "train.max_epochs=2", "train.synthetic_size=96", "train.samples_per_image=4"
        )
    )
    with (summary["run_log"] / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert all(0 <= float(rows[-1][f"val_dice_{c}"]) <= 1 for c in range(3))
    assert (summary["run_log"] / "curves.png").read_bytes()[:4] == b"\x89PNG"
    best = str(summary["run_weights"] / "best.pt")
    capsys.readouterr()
    assert test_script.main(["--checkpoint", best, "--output", str(tmp_path / "diagnostics")]) == 0
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.strip().startswith("image"))
    assert (
        header.split()[-6:] == ["Dice", "0", "Dice", "1", "Dice", "2"] and header.count("Dice") == 4
    )  # foreground mean, then each class
    counts = np.zeros((3, 3), dtype=np.int64)  # true class x predicted class, counted from the written files
    for mask_path in sorted((tmp_path / "diagnostics" / "masks").glob("*.png")):
        written = skimage.io.imread(mask_path)
        assert written.dtype == np.uint8 and set(np.unique(written)) <= {0, 1, 2}  # class indices, not 0/255
        index = int(mask_path.stem.split()[-1])
        truth = SyntheticSample(mask_path.stem, 0, index, 96, 3).read({}).label
        np.add.at(counts, (truth.ravel(), written.ravel()), 1)
    line = next(line for line in table.splitlines() if line.strip().startswith("all")).split()
    for c in range(3):
        dice = (
            2 * counts[c, c] / (counts[c].sum() + counts[:, c].sum()) if counts[c].sum() + counts[:, c].sum() else 1.0
        )
        assert float(line[-3 + c]) == pytest.approx(dice, abs=1e-4)
