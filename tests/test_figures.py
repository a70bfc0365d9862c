"""segmentation.runs.figures: every figure is a PNG, also for a dead layer and NumPy inputs."""

import numpy as np
import torch

from segmentation.data.weight_maps import weight_map
from segmentation.runs.diagnostics import (
    activation_maps,
    input_saliency,
    layer_gradient_norms,
    save_activation_figure,
    save_gradient_norm_figure,
    save_saliency_figure,
)
from segmentation.runs.figures import save_samples_figure
from tests.helpers import sample, tiny_unet


def assert_png(path):
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_are_written(tmp_path):
    model = tiny_unet()
    image, label, weight = sample()
    norms = layer_gradient_norms(model, image, label, weight)
    norms[1] = (norms[1][0], 0.0, norms[1][2])  # a dead layer must not break the log scale
    save_gradient_norm_figure(tmp_path / "norms.png", norms, title="gradients")
    save_activation_figure(tmp_path / "maps.png", activation_maps(model, image, channels=4), title="maps")
    saliency = input_saliency(model, image, label, weight)
    save_saliency_figure(tmp_path / "saliency.png", image[0], saliency, title="saliency")
    save_saliency_figure(tmp_path / "saliency_numpy.png", image[0].numpy(), saliency.numpy())
    for name in ("norms", "maps", "saliency", "saliency_numpy"):
        assert_png(tmp_path / f"{name}.png")


def test_samples_figure_of_one_weight_map_writes_png(tmp_path, tiny_cells):
    label, instances = tiny_cells
    image = np.random.default_rng(0).random(label.shape).astype(np.float32)
    path = tmp_path / "weights.png"
    arrays = (image[None], label.astype(np.int64), weight_map(label, instances))
    save_samples_figure(path, *(torch.from_numpy(array)[None] for array in arrays), title="tiny")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
