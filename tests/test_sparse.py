"""Labels as people make them (train.ignore_value): a run trained from scribbles, scored by test.py on the annotated
pixels alone, and Cellpose 2.0's loop of starting from a trained model and fine-tuning it on a few strokes."""

import numpy as np
import pytest
import skimage.io
import test_script
import torch

from segmentation.benchmarks.sparse import isbi_scribbles
from segmentation.data.synthetic import synthetic_em_set
from tests.helpers import folder_overrides, plain_folder_config
from training import train


def write_em_folder(root, count: int, scribbled: bool, seed: int = 0) -> None:
    """``count`` synthetic EM slices of 96 px with their dense 0/255 masks, or scribbles of them (128 elsewhere)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(seed)
    for index, (image, label, _) in enumerate(synthetic_em_set(count, 96, seed=seed)):
        mask = isbi_scribbles(label, rng, 0.1) if scribbled else (label * 255).astype(np.uint8)
        skimage.io.imsave(root / "images" / f"s{index}.png", (image * 255).astype(np.uint8), check_contrast=False)
        skimage.io.imsave(root / "masks" / f"s{index}.png", mask, check_contrast=False)


@pytest.mark.slow
def test_a_run_trains_from_scribbles_and_test_py_scores_the_annotated_pixels(tmp_path, capsys):
    write_em_folder(tmp_path / "scribbles", 6, scribbled=True)
    split = ["train.val_images=[4]", "train.test_images=[5]", "train.ignore_value=128", "train.max_epochs=2"]
    config = plain_folder_config(tmp_path / "scribbles", *folder_overrides(tmp_path / "scribbles")[:6], *split)
    result = train(config)
    last = torch.load(result.folders.weights / "last.pt", weights_only=True)
    assert last["plan"]["ignore_value"] == 128.0 and result.validation is not None
    assert np.isfinite(result.validation.loss) and 0 <= result.validation.scores["pixel_error"] <= 1
    capsys.readouterr()
    assert (
        test_script.main(["--checkpoint", str(result.folders.weights / "best.pt"), "--output", str(tmp_path / "d")])
        == 0
    )
    out = capsys.readouterr().out
    masks = skimage.io.imread(tmp_path / "scribbles" / "masks" / "s5.png")
    annotated = 100 * np.mean(masks != 128)
    assert f"(scored on the annotated pixels alone, {annotated:.1f} % of the pixels (train.ignore_value)" in out


@pytest.mark.slow
def test_a_trained_model_is_fine_tuned_on_a_few_strokes(tmp_path, capsys):
    """Cellpose 2.0's loop: a model trained on dense masks starts a run on scribbles of other images."""
    write_em_folder(tmp_path / "dense", 4, scribbled=False, seed=1)
    dense = plain_folder_config(tmp_path / "dense", *folder_overrides(tmp_path / "dense")[:6], "train.max_epochs=1")
    source = train(dense).folders.weights / "best.pt"
    write_em_folder(tmp_path / "strokes", 4, scribbled=True, seed=2)
    overrides = [*folder_overrides(tmp_path / "strokes")[:6], "train.ignore_value=128", f"train.init_from={source}"]
    capsys.readouterr()
    result = train(plain_folder_config(tmp_path / "strokes", *overrides, "train.max_epochs=1"))
    notes = [line for line in capsys.readouterr().err.splitlines() if "train.init_from:" in line]
    assert len(notes) == 1 and " of " in notes[0] and "starting fresh" not in notes[0]  # the same network, all of it
    assert result.progress.epoch == 1 and np.isfinite(result.validation.loss)
