"""StarDist2D for a time budget, run by StarDist's own Python (``bench.py --peers stardist``), not by this project's.

    PYTHON peer_stardist.py WORK MINUTES

``WORK/data.npz`` holds ``train_image_<i>``, ``train_mask_<i>`` (object ids) and ``held_image_<i>`` arrays, written
by ``segmentation.benchmarks.peers``. The settings are those of StarDist's own 2D training example
(examples/2D/2_training.ipynb): images normalised to their 1st-99.8th percentiles, label holes filled, 15 % of the
training images for validation, 32 rays, a grid of 2, flips, turns and intensity changes as augmentation,
``train`` with its defaults, then ``optimize_thresholds`` on the validation images. Training ends at the budget
(counted from this script's start) through a Keras callback; the held images' ``predict_instances`` go to
``WORK/predictions.npz`` as ``held_<i>``. Prints ``stardist: <epochs> epochs, <steps> steps, <seconds> s``.

Only the standard library, StarDist and what it brings may be imported here.
"""

import os
import sys
import time

STARTED = time.monotonic()


def augment(x, y, rng):
    """StarDist's example augmentation: a random flip and 90-degree turn, and a random intensity change."""
    import numpy as np

    turns, axis = rng.integers(4), rng.integers(2)
    x, y = np.rot90(x, turns, axes=(0, 1)), np.rot90(y, turns, axes=(0, 1))
    x, y = np.flip(x, axis), np.flip(y, axis)
    return x * rng.uniform(0.6, 2) + rng.uniform(-0.2, 0.2), y


def main(work: str, minutes: float) -> None:
    import numpy as np
    import tensorflow as tf
    from csbdeep.utils import normalize
    from stardist import fill_label_holes
    from stardist.models import Config2D, StarDist2D

    deadline = STARTED + 60 * minutes
    data = np.load(os.path.join(work, "data.npz"))
    count = sum(name.startswith("train_image_") for name in data.files)
    held = sum(name.startswith("held_image_") for name in data.files)
    images = [data[f"train_image_{i}"] for i in range(count)]
    channels = 1 if images[0].ndim == 2 else images[0].shape[-1]
    images = [normalize(x, 1, 99.8, axis=(0, 1)) for x in images]
    masks = [fill_label_holes(data[f"train_mask_{i}"]) for i in range(count)]
    order = np.random.RandomState(42).permutation(count)
    validation_count = max(1, int(round(0.15 * count)))
    validation, training = order[:validation_count], order[validation_count:]
    side = min(256, *(min(x.shape[:2]) for x in images))
    config = Config2D(
        n_rays=32, grid=(2, 2), n_channel_in=channels, use_gpu=False, train_patch_size=(side // 16 * 16,) * 2
    )
    model = StarDist2D(config, name="stardist", basedir=os.path.join(work, "models"))

    class Budget(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.steps = 0

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1
            if time.monotonic() >= deadline:
                self.model.stop_training = True

    budget = Budget()
    model.prepare_for_training()
    model.callbacks.append(budget)
    rng = np.random.default_rng(0)
    x_val, y_val = [images[i] for i in validation], [masks[i] for i in validation]
    history = model.train(
        [images[i] for i in training],
        [masks[i] for i in training],
        validation_data=(x_val, y_val),
        augmenter=lambda x, y: augment(x, y, rng),
    )
    model.optimize_thresholds(x_val, y_val)
    trained = time.monotonic() - STARTED
    found = {}
    for i in range(held):
        image = normalize(data[f"held_image_{i}"], 1, 99.8, axis=(0, 1))
        found[f"held_{i}"] = model.predict_instances(image)[0].astype(np.int32)
    np.savez_compressed(os.path.join(work, "predictions.npz"), **found)
    print(f"stardist: {len(history.history['loss'])} epochs, {budget.steps} steps, {trained:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
