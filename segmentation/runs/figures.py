"""Figures of runs as PNG files: training curves, samples with their weight maps, losses, and test.py's diagnostics.

Each function draws on a bare matplotlib ``Figure`` (the Agg backend, no GUI, nothing registered with
pyplot) and writes one PNG; matplotlib is imported inside them, so that importing this module is fast.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from losses import IGNORE_LABEL
from segmentation.data.augment import augment_on_device
from segmentation.runs.folders import per_class_columns
from segmentation.settings import AugmentSettings


def save_samples_figure(
    path: str | os.PathLike,
    image: Tensor,
    label: Tensor,
    weight: Tensor,
    count: int = 4,
    title: str = "",
) -> None:
    """Save a PNG of samples to check by eye: one row per sample, columns image, label and weight map.

    Used for the weight map of a whole training image and for augmented training tiles.

    Parameters
    ----------
    path : str or os.PathLike
        Output PNG file.
    image : Tensor
        (B, C, H, W) float; one channel is shown in gray, three as RGB (each sample stretched to
        [0, 1]), otherwise the first channel.
    label : Tensor
        (B, H, W) int class indices.
    weight : Tensor
        (B, H, W) float weight maps, on one colour scale for all rows.
    count : int, optional
        Number of samples shown, the first ones of the batch (fewer if the batch is smaller).
    title : str, optional
        Figure title.
    """
    # matplotlib is imported here so that importing this module stays fast; a bare Figure renders
    # with Agg and is never registered with pyplot, so it needs no GUI backend and no closing.
    from matplotlib.figure import Figure

    if label.ndim == 4:  # volumes (B, C, D, H, W): their middle sections
        middle = label.shape[1] // 2
        image, label, weight = image[:, :, middle], label[:, middle], weight[:, middle]
        title = f"{title} (middle sections)" if title else title
    rows = min(count, image.shape[0])
    images = image[:rows].detach().float().cpu().numpy()
    labels = label[:rows].detach().cpu().numpy()
    weights = weight[:rows].detach().float().cpu().numpy()
    weight_range = {"vmin": float(weights.min()), "vmax": float(weights.max())}

    figure = Figure(figsize=(9, 3 * rows + 0.5), layout="constrained")
    axes = figure.subplots(rows, 3, squeeze=False)
    for row in range(rows):
        if images.shape[1] == 3:
            rgb = np.moveaxis(images[row], 0, -1)
            rgb = (rgb - rgb.min()) / max(float(np.ptp(rgb)), 1e-12)
            axes[row, 0].imshow(rgb, interpolation="nearest")
        else:
            axes[row, 0].imshow(images[row, 0], cmap="gray", interpolation="nearest")
        axes[row, 1].imshow(labels[row], cmap="gray", interpolation="nearest")
        weight_plot = axes[row, 2].imshow(weights[row], cmap="viridis", interpolation="nearest", **weight_range)
        for column in range(3):
            axes[row, column].set_axis_off()
    for column, name in enumerate(("image", "label", "weight")):
        axes[0, column].set_title(name)
    figure.colorbar(weight_plot, ax=axes[:, 2], shrink=0.6)
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=100)


def save_check_figures(
    run_log: Path,
    example: tuple,
    tiles,
    augment: AugmentSettings,
    seed: int,
    device: torch.device,
    spacing: tuple[float, ...] | None = None,
) -> None:
    """The figures of a new run to check by eye before trusting the training: ``weight_map.png``, the first
    training image with its label and weight map (``example``: (C, H, W), (H, W), (H, W) arrays), and
    ``augmented_samples.png``, the first few training ``tiles`` as the augmentation turns them (volumes: their
    middle sections; ``spacing`` their voxel size)."""
    title = "first training image and its weight map"
    save_samples_figure(run_log / "weight_map.png", *(torch.from_numpy(array)[None] for array in example), title=title)
    first = [tiles[i] for i in range(min(4, len(tiles)))]
    batch = [torch.stack(tensors) for tensors in zip(*first)]
    augmented = augment_on_device(batch, augment, seed, -1, device, spacing=spacing)
    title = "augmented training tiles (the loss uses the centre of label and weight)"
    save_samples_figure(run_log / "augmented_samples.png", *augmented, title=title)


def plot_curves(rows: list[dict], path: Path) -> None:
    """Training and validation curves by epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        points = [(int(row["epoch"]), float(row[key])) for row in rows if row.get(key) not in (None, "")]
        return [p[0] for p in points], [p[1] for p in points]

    figure, (loss_axis, score_axis, vi_axis) = plt.subplots(1, 3, figsize=(16, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        loss_axis.plot(*series(key), marker=".", label=label)
    loss_axis.set(xlabel="epoch", ylabel="loss", title="loss")
    loss_axis.set_yscale("log")
    per_class = per_class_columns(rows)
    for key, label in (
        ("val_dice", "Dice (foreground)"),
        ("val_iou", "IoU (foreground)"),
        ("val_pixel_error", "pixel error"),
        ("val_rand_error", "Rand error (cells)"),
        *((key, f"Dice of class {key[9:]}") for key in per_class),
    ):
        score_axis.plot(*series(key), marker=".", label=label)
    score_axis.set(xlabel="epoch", ylim=(0, 1), title="validation")
    vi_axis.plot(*series("val_vi"), marker=".", label="variation of information (cells)")
    vi_axis.set(xlabel="epoch", ylabel="bits", title="validation: variation of information")
    for axis in (loss_axis, score_axis, vi_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    temporary = path.with_name(path.stem + ".tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, path)


def plot_losses(curves: dict[str, list[float]], path: Path, title: str, tolerance: float) -> None:
    """Loss per step of each named curve (finite values; log y) and the tolerance, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 5))
    for label, losses in curves.items():
        steps = [step for step, loss in enumerate(losses, 1) if math.isfinite(loss)]
        axis.plot(steps, [losses[step - 1] for step in steps], label=label)
    axis.axhline(tolerance, color="gray", linestyle="--", label=f"tolerance {tolerance:g}")
    axis.set(xlabel="step", ylabel="loss on the batch", title=title, yscale="log")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_lr_find(lrs: list[float], losses: list[float], smoothed: list[float], suggested: float, path: Path) -> None:
    """Loss and smoothed loss against the learning rate (log x), the suggestion marked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    axis.plot(lrs, losses, alpha=0.3, label="loss")
    axis.plot(lrs, smoothed, label="smoothed loss")
    axis.axvline(suggested, color="red", linestyle="--", label=f"suggested lr {suggested:.2g}")
    finite = [value for value in smoothed if math.isfinite(value)]
    lowest = min(value for value in losses + smoothed if math.isfinite(value))
    # the raw loss of the last steps can be far off the scale of the rest
    axis.set(
        xscale="log",
        xlabel="learning rate",
        ylabel="training loss",
        title="learning-rate range test",
        ylim=(0.9 * lowest, 1.1 * max(finite)),
    )
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save_prediction_figure(
    path: Path,
    image: np.ndarray,
    label: np.ndarray,
    prediction: np.ndarray,
    probability: np.ndarray,
    weight: np.ndarray,
    title: str,
    aspect: float = 1.0,
) -> None:
    """Six panels: input (C, H, W), truth and prediction (H, W) class maps, P(class 1) from the
    (K, H, W) probabilities, errors, weights. Unannotated pixels (``losses.IGNORE_LABEL``) are gray in the
    truth and in the errors, which they have none of. Of a volume ((C, D, H, W) and (D, H, W) arrays), a row
    of the six per orthogonal view through its centre: xy (the middle section), xz and yz, z stretched by
    ``aspect`` (a section's thickness over a pixel's width)."""
    from matplotlib.figure import Figure

    views = [("", (slice(None),) * 2)]
    if label.ndim == 3:
        depth, height, width = label.shape
        views = [
            ("xy", (depth // 2, slice(None), slice(None))),
            ("xz", (slice(None), height // 2, slice(None))),
            ("yz", (slice(None), slice(None), width // 2)),
        ]
    figure = Figure(figsize=(18, 3.6 * len(views)))
    for row, (view, at) in enumerate(views):
        arrays = (image[(slice(None), *at)], label[at], prediction[at], probability[(slice(None), *at)], weight[at])
        panels = prediction_panels(*arrays)
        for index, (name, data, colormap) in enumerate(panels):
            axis = figure.add_subplot(len(views), len(panels), row * len(panels) + index + 1)
            stretch = aspect if view in ("xz", "yz") else 1.0
            shown = axis.imshow(data, cmap=colormap, interpolation="nearest", aspect=stretch)
            if name in ("P(class 1)", "weight map"):
                figure.colorbar(shown, ax=axis, fraction=0.046)
            axis.set_title(f"{name} ({view})" if view else name, fontsize=9)
            axis.axis("off")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def prediction_panels(
    image: np.ndarray, label: np.ndarray, prediction: np.ndarray, probability: np.ndarray, weight: np.ndarray
) -> list[tuple[str, np.ndarray, str | None]]:
    """The six ``(name, data, colour map)`` panels of ``save_prediction_figure`` of one 2D view."""
    given = label != IGNORE_LABEL
    errors = np.zeros(label.shape + (3,), dtype=np.float32)
    errors[~given] = (0.5, 0.5, 0.5)
    errors[(prediction != label) & (label == 0)] = (1, 0.2, 0.2)  # predicted foreground on background: red
    errors[(prediction != label) & (label != 0) & given] = (0.2, 0.4, 1)  # missed foreground: blue
    panels = [
        ("input", display_image(image), "gray"),
        ("ground truth", np.ma.masked_where(~given, label), "viridis"),
        ("prediction", prediction, "viridis"),
        ("P(class 1)", probability[1], "magma"),
        ("errors (red: false 1, blue: missed 1)", errors, None),
        ("weight map", weight, "inferno"),
    ]
    return panels


def display_image(image: np.ndarray) -> np.ndarray:
    """(C, H, W) normalised image -> (H, W) or (H, W, 3) in [0, 1] for imshow."""
    shown = image[0] if image.shape[0] == 1 else np.moveaxis(image[:3], 0, -1)
    return (shown - shown.min()) / max(float(shown.max() - shown.min()), 1e-12)


def save_gradient_norm_figure(path: str | Path, norms: Sequence[tuple[str, float, float]], title: str = "") -> None:
    """Plot per-layer gradient norms, weight norms and their ratio on log scales; PNG.

    Parameters
    ----------
    path : str or Path
        Output PNG file.
    norms : sequence of (name, gradient norm, weight norm)
        As returned by ``layer_gradient_norms``, in network order.
    title : str, optional
        Figure title.

    Notes
    -----
    Gradient norms that fall by orders of magnitude towards the input mean vanishing gradients; a
    gradient/weight ratio far above about 1e-2 means one step of a typical learning rate would change
    that layer a lot (exploding). Zero values cannot be drawn on a log scale: the lines skip them, and
    parameters with an exactly zero gradient (dead layers) are shaded red.
    """
    from matplotlib.figure import Figure

    names = [name for name, _, _ in norms]
    gradient = np.array([value for _, value, _ in norms], dtype=np.float64)
    weight = np.array([value for _, _, value in norms], dtype=np.float64)
    positions = np.arange(len(names))
    both = (gradient > 0) & (weight > 0)
    ratio = gradient[both] / weight[both]

    figure = Figure(figsize=(max(8.0, 0.16 * len(names) + 2.0), 7.5))
    norm_axis, ratio_axis = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    # Each line joins only its positive values, which a log axis can show; zero-initialised biases
    # would otherwise break the weight line into isolated points.
    norm_axis.plot(positions[gradient > 0], gradient[gradient > 0], "o-", markersize=3, label="gradient norm")
    norm_axis.plot(positions[weight > 0], weight[weight > 0], "s-", markersize=3, label="weight norm")
    ratio_axis.plot(positions[both], ratio, "d-", markersize=3, color="tab:green", label="gradient / weight")
    for axis in (norm_axis, ratio_axis):
        for index in np.flatnonzero(gradient == 0):
            axis.axvspan(index - 0.5, index + 0.5, color="tab:red", alpha=0.25, linewidth=0)
        axis.set_yscale("log")
        axis.grid(True, which="major", alpha=0.3)
        axis.legend(fontsize=8, loc="best")
    norm_axis.set_ylabel("L2 norm")
    ratio_axis.set_ylabel("ratio")
    ratio_axis.set_xticks(positions)
    ratio_axis.set_xticklabels(names, rotation=90, fontsize=6)
    ratio_axis.set_xlim(-0.5, len(names) - 0.5)
    if np.any(gradient == 0):
        norm_axis.set_title("red: zero gradient", fontsize=8, loc="right", color="tab:red")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _display_range(array: np.ndarray) -> np.ndarray:
    """Scale ``array`` linearly to [0, 1] by its minimum and maximum (a constant array gives zeros)."""
    low, high = float(array.min()), float(array.max())
    return (array - low) / max(high - low, 1e-12)


def save_activation_figure(path: str | Path, activations: dict[str, Tensor], title: str = "") -> None:
    """Grid of feature maps: one row per layer, one column per channel; PNG.

    Parameters
    ----------
    path : str or Path
        Output PNG file.
    activations : dict of str to Tensor
        As returned by ``activation_maps``: layer name to maps of shape (channels, h, w).
    title : str, optional
        Figure title.

    Notes
    -----
    Each map is scaled to its own minimum and maximum, so the grey levels compare pixels within one
    map, not between maps. The row label gives the layer's name and the shape of its maps.
    """
    from matplotlib.figure import Figure

    rows = len(activations)
    columns = max((maps.shape[0] for maps in activations.values()), default=1)
    figure = Figure(figsize=(1.5 * columns + 1.2, 1.5 * rows + 0.6))
    axes = np.asarray(figure.subplots(rows, columns, squeeze=False))
    for row, (name, maps) in enumerate(activations.items()):
        data = maps.float().numpy()
        data = data[:, data.shape[1] // 2] if data.ndim == 4 else data  # a volume's maps: the middle section
        for column in range(columns):
            axis = axes[row, column]
            axis.set_xticks([])
            axis.set_yticks([])
            if column < data.shape[0]:
                axis.imshow(_display_range(data[column]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                axis.set_axis_off()
            if row == 0:
                axis.set_title(f"channel {column}", fontsize=8)
        axes[row, 0].set_ylabel(f"{name}\n{data.shape[0]}x{data.shape[1]}x{data.shape[2]}", fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def save_saliency_figure(
    path: str | Path, image: np.ndarray | Tensor, saliency: np.ndarray | Tensor, title: str = ""
) -> None:
    """Input, saliency map and the saliency overlaid on the input, side by side; PNG.

    Parameters
    ----------
    path : str or Path
        Output PNG file.
    image : ndarray or Tensor, shape (C, H, W), float
        The network input. Three channels are shown as RGB, any other count as the channel mean.
    saliency : ndarray or Tensor, shape (H, W), float
        As returned by ``input_saliency``.
    title : str, optional
        Figure title.

    Notes
    -----
    The colour scale of the saliency ends at its 99th percentile: a few very salient pixels would
    otherwise leave the rest of the map black.
    """
    from matplotlib.figure import Figure

    image = image.detach().cpu().float().numpy() if isinstance(image, Tensor) else np.asarray(image, dtype=np.float32)
    saliency = (
        saliency.detach().cpu().float().numpy()
        if isinstance(saliency, Tensor)
        else np.asarray(saliency, dtype=np.float32)
    )
    if saliency.ndim == 3:  # a volume's (C, D, H, W) input and (D, H, W) saliency: the middle section
        image, saliency = image[:, saliency.shape[0] // 2], saliency[saliency.shape[0] // 2]
    shown = _display_range(np.moveaxis(image, 0, -1) if image.shape[0] == 3 else image.mean(axis=0))
    top = float(np.percentile(saliency, 99))
    scaled = np.clip(saliency / top, 0.0, 1.0) if top > 0 else np.zeros_like(saliency)

    figure = Figure(figsize=(13, 4.4))
    axes = figure.subplots(1, 3)
    axes[0].imshow(shown, cmap="gray", interpolation="nearest")
    axes[0].set_title("input", fontsize=9)
    heat = axes[1].imshow(saliency, cmap="magma", vmin=0, vmax=top if top > 0 else None, interpolation="nearest")
    figure.colorbar(heat, ax=axes[1], fraction=0.046, label="|d loss / d input|")
    axes[1].set_title("saliency (max over channels)", fontsize=9)
    axes[2].imshow(shown, cmap="gray", interpolation="nearest")
    # Opacity follows the saliency so that unimportant regions show the plain input.
    axes[2].imshow(scaled, cmap="magma", vmin=0, vmax=1, alpha=scaled, interpolation="nearest")
    axes[2].set_title("overlay", fontsize=9)
    for axis in axes:
        axis.axis("off")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
