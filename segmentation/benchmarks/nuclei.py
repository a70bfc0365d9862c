"""The nuclei experiment: touching synthetic nuclei trained from instance-id and from 0/255 masks, scored by object F1.

``bench.py --nuclei-experiment EPOCHS`` prints the table; each run is ``python training.py`` in a
subprocess, scored in a fresh process (``speed.in_child``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from segmentation.benchmarks.speed import ROOT, in_child


def nuclei_experiment(epochs: int, seeds: list[int]) -> None:
    """``--nuclei-experiment``: 30 synthetic images of touching nuclei (``synthetic.touching_nuclei``),
    trained with the shipped config once from instance-id masks and once from the same masks as 0/255,
    per seed; prints the object F1 at IoU 0.5 and the Dice on the 6 held-out test images."""

    import skimage.io
    import tifffile

    from segmentation.data.synthetic import touching_nuclei

    root = Path(tempfile.mkdtemp(prefix="unet-bench-nuclei-"))
    try:
        truth = []
        for kind in ("ids", "binary"):
            (root / kind / "images").mkdir(parents=True)
            (root / kind / "masks").mkdir()
        for index, child in enumerate(np.random.SeedSequence(7).spawn(30)):
            image, ids = touching_nuclei(256, np.random.default_rng(child), spacing=22.0)
            truth.append(ids)
            for kind in ("ids", "binary"):
                skimage.io.imsave(
                    root / kind / "images" / f"{index:02d}.png", (image * 255).astype(np.uint8), check_contrast=False
                )
            tifffile.imwrite(root / "ids" / "masks" / f"{index:02d}.tif", ids, photometric="minisblack")
            skimage.io.imsave(
                root / "binary" / "masks" / f"{index:02d}.png", ((ids > 0) * 255).astype(np.uint8), check_contrast=False
            )
        print(
            "\ntouching nuclei: 30 images of 256 px, trained on 21, validated on 3, scored on 6 (24-29) against "
            f"the true ids; {epochs} epochs of the shipped config"
        )
        print(f"{'masks':>18} {'seed':>5} {'object F1':>10} {'Dice':>8} {'minutes':>8}")
        for kind, label in (("ids", "instance ids"), ("binary", "0/255")):
            for seed in seeds:
                overrides = [
                    "train.dataset_name=folder",
                    f"train.data={root / kind}",
                    f"train.cache_dir={root / 'cache'}",
                    f"train.save_path={root / 'weights'}",
                    f"train.log_path={root / 'logs'}",
                    f"train.run_name={kind}-{seed}",
                    f"train.seed={seed}",
                    f"train.max_epochs={epochs}",
                    "train.val_images=[21, 22, 23]",
                    "train.test_images=[24, 25, 26, 27, 28, 29]",
                ]
                start = time.perf_counter()
                subprocess.run(
                    [sys.executable, str(ROOT / "training.py"), *overrides],
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                minutes = (time.perf_counter() - start) / 60
                scores = in_child(score_objects, root / "weights" / f"{kind}-{seed}" / "best.pt", truth[24:])
                print(f"{label:>18} {seed:>5} {scores['f1']:>10.3f} {scores['dice']:>8.3f} {minutes:>8.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def score_objects(checkpoint: Path, truth: list, queue) -> None:
    """Child process: object F1 at IoU 0.5 and Dice of a checkpoint on its config's test images,
    against the true object ids ``truth`` (one array per test image)."""
    from segmentation.data.readers import object_instances
    from segmentation.inference.trained import load_trained
    from segmentation.metrics import matching_scores, object_matching

    # as this experiment first measured it: the calibrated threshold, without cleaning the objects
    # the run's own cache (ROOT/weights/RUN/best.pt beside ROOT/cache): a checkpoint never names folders
    cache = f"train.cache_dir={checkpoint.parents[2] / 'cache'}"
    trained = load_trained(checkpoint, None, [cache, "predict.min_object_size=0", "predict.fill_holes=false"])
    test, predictor, device = trained.datasets(lambda message: None).test, trained.predictor, trained.device
    matched, overlap, total = np.zeros(4), 0, 0
    for (image, _, _), ids in zip(test, truth):
        classes = predictor.classes(predictor.probabilities(image.to(device))).numpy()
        matched += object_matching(ids, object_instances(classes))
        overlap, total = (
            overlap + np.count_nonzero((classes == 1) & (ids > 0)),
            total + np.count_nonzero(classes == 1) + np.count_nonzero(ids > 0),
        )
    queue.put({"f1": matching_scores(matched)["f1"], "dice": 2 * overlap / total})
