"""Diagnostics of a trained model on annotated images: scores, masks, and figures of predictions, saliency, gradient norms and activations.

``diagnose`` writes, for each test (or validation) image, its mask and a figure of input, truth,
prediction, probability, errors and weight map, and the saliency (the gradient of the loss with respect
to the input); for the first image the per-layer gradient and weight norms and activation maps; and it
prints the scores of the masks as written. The functions behind the figures are checked against
finite differences and hand-computed gradients in the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import skimage.io
import tifffile
import torch
from torch import Tensor, nn

from dataset import build_datasets
from losses import segmentation_loss
from segmentation.config import UserError
from segmentation.console import note
from segmentation.data.preprocess import network_margin, pad_for_model
from segmentation.data.readers import object_instances
from segmentation.inference.infer import (
    evaluating,
    predict_with_config,
    predicted_classes,
    uniform_prediction_note,
)
from segmentation.inference.predict import mask_image
from segmentation.metrics import (
    image_scores,
    instance_f1,
    instance_matches,
    pool_scores,
    segmentation_scores,
)


def diagnose(
    model,
    config: dict,
    device: torch.device,
    output: Path,
    layers: list[str] | None,
    tta: bool,
    split: str | None = None,
    threshold: float = 0.5,
    instances: bool = False,
) -> dict[str, float]:
    """Masks, figures and a printed table of scores for every image of ``split`` (``test``: the images
    of ``train.test_images``; ``val``: the validation images; default: test when there are test images);
    returns the overall scores. The scores are those of the masks written to ``output/masks``; with
    two classes also the instance F1 at IoU 0.5 of the predicted objects against the true ones, and
    with ``instances`` their ids as ``masks/<name>_instances.tif``."""
    data = build_datasets(config, note)
    split = split or ("test" if data["test"] is not None else "val")
    if data[split] is None:
        raise UserError(
            "--split test: the config sets no train.test_images; use --split val, or train with train.test_images=[...]"
        )
    dataset = data[split]
    predict, num_classes = config["predict"], config["unet"]["num_classes"]
    (output / "masks").mkdir(parents=True, exist_ok=True)
    total, cell_scores, objects, uniform = (
        torch.zeros(num_classes, num_classes, dtype=torch.int64),
        [],
        np.zeros(3, dtype=np.int64),
        [],
    )
    print(
        f"{len(dataset)} {'test' if split == 'test' else 'validation'} images"
        + (f", class 1 at probability >= {threshold:.2f}" if num_classes == 2 else "")
    )
    columns = score_columns(num_classes)
    print(table_line("image", None, columns))
    for index, (image, label, weight) in enumerate(dataset):
        probabilities = predict_with_config(model, image.to(device), config, tta).cpu()
        name = dataset.names[index]
        classes = predicted_classes(
            probabilities, threshold, predict["watershed_seeds"], predict["watershed_min_seed"]
        ).numpy()
        mask_path = output / "masks" / f"{Path(name).stem}.png"
        skimage.io.imsave(mask_path, mask_image(classes, num_classes), check_contrast=False)
        # score the mask as written: the file is what a user would submit
        written = skimage.io.imread(mask_path).astype(np.int64)
        written = written // 255 if num_classes == 2 else written
        confusion, cells = image_scores(torch.from_numpy(written), label, num_classes)
        total += confusion
        scores = {**segmentation_scores(confusion), **(cells or {})}
        if cells:
            cell_scores.append(cells)
        if num_classes == 2:
            found = object_instances(written)
            matched = instance_matches(dataset.images[index].instances(), found)
            objects += matched
            scores["object_f1"] = instance_f1(*matched)
            if instances:
                tifffile.imwrite(
                    output / "masks" / f"{Path(name).stem}_instances.tif",
                    found.astype(np.uint16 if found.max() < 2**16 else np.uint32),
                    photometric="minisblack",
                )
        if len(np.unique(written)) == 1:
            uniform.append(name)
        print(table_line(name, scores, columns))
        save_image_figures(
            model,
            config,
            device,
            output,
            split,
            index,
            name,
            (image, label, weight),
            classes,
            probabilities,
            scores,
            layers,
        )
    overall = pool_scores(total, cell_scores)
    if num_classes == 2:
        overall["object_f1"] = instance_f1(*objects)
    print(table_line("all", overall, columns))
    if num_classes == 2:
        print(
            f"(Rand error and VI: on the 4-connected components of class 1 in the masks, foreground-restricted; means over images. Object F1: "
            f"{objects[0]} of {objects[1]} true and {objects[2]} predicted objects matched at IoU > 0.5)"
        )
    if uniform:
        note(uniform_prediction_note(uniform, len(dataset), f"{'test' if split == 'test' else 'validation'} images"))
    print(
        f"masks: {output}/masks/; figures: {output}/{split}_*.png, saliency_*.png, gradient_norms.png, activations.png"
    )
    return overall


def score_columns(num_classes: int) -> list[tuple[str, str, int]]:
    """The table's columns ``(title, score key, width)``: pixel error, Dice and IoU of the foreground,
    with two classes the Rand error, VI and object F1, with more the Dice of each class."""
    columns = [("pixel error", "pixel_error", 12), ("Dice", "dice", 8), ("IoU", "iou", 8)]
    if num_classes == 2:
        return columns + [("Rand error", "rand_error", 11), ("VI", "vi", 8), ("object F1", "object_f1", 10)]
    return columns + [(f"Dice {c}", f"dice_{c}", 8) for c in range(num_classes)]


def table_line(label: str, scores: dict | None, columns: list[tuple[str, str, int]], label_width: int = 24) -> str:
    """One line of a score table: ``label`` right-aligned, then each column's score to 4 decimals, or
    the column titles where ``scores`` is None."""
    cells = (f" {title:>{size}}" if scores is None else f" {scores[key]:>{size}.4f}" for title, key, size in columns)
    return f"{label:>{label_width}}" + "".join(cells)


def score_summary(names: Sequence[str], results: Sequence[dict], num_classes: int) -> str:
    """A table of the overall scores of several runs (``diagnose``'s return values): one row per run,
    then their mean and sample standard deviation (ddof 1; 0 for a single run)."""
    columns = score_columns(num_classes)
    width = max(24, *(len(name) for name in names))
    lines = [table_line("run", None, columns, width)] + [
        table_line(name, scores, columns, width) for name, scores in zip(names, results)
    ]
    values = {key: np.array([scores[key] for scores in results], dtype=np.float64) for _, key, _ in columns}
    lines.append(table_line("mean", {key: value.mean() for key, value in values.items()}, columns, width))
    lines.append(
        table_line(
            "std",
            {key: value.std(ddof=1) if len(results) > 1 else 0.0 for key, value in values.items()},
            columns,
            width,
        )
    )
    return "\n".join(lines) + f"\n({len(results)} runs; std: the sample standard deviation over runs)"


def save_image_figures(
    model,
    config: dict,
    device: torch.device,
    output: Path,
    split: str,
    index: int,
    name: str,
    item: tuple,
    classes: np.ndarray,
    probabilities: Tensor,
    scores: dict,
    layers: list[str] | None,
) -> None:
    """The figures of one image: prediction panels and saliency; for the first image also the
    per-layer gradient and weight norms and the activation maps."""
    image, label, weight = item
    title = f"{name}: pixel error {scores['pixel_error']:.4f}, Dice {scores['dice']:.4f}"
    save_prediction_figure(
        output / f"{split}_{index:03d}.png",
        image.numpy(),
        label.numpy(),
        classes,
        probabilities.numpy(),
        weight.numpy(),
        title,
    )
    whole = whole_image_batch(model, image, label, weight, device)
    saliency = input_saliency(model, *whole, config["train"]["loss"])
    margin = network_margin(model.depth, model.padding)
    saliency = saliency[margin : margin + label.shape[0], margin : margin + label.shape[1]]
    save_saliency_figure(
        output / f"saliency_{index:03d}.png", image.numpy(), saliency.cpu(), title=f"{name}: |d loss / d input|"
    )
    if index == 0:
        norms = layer_gradient_norms(model, *whole, config["train"]["loss"])
        save_gradient_norm_figure(output / "gradient_norms.png", norms, title=f"per-layer norms on {name}")
        save_activation_figure(
            output / "activations.png", activation_maps(model, whole[0], layers), title=f"activations on {name}"
        )


def save_prediction_figure(
    path: Path,
    image: np.ndarray,
    label: np.ndarray,
    prediction: np.ndarray,
    probability: np.ndarray,
    weight: np.ndarray,
    title: str,
) -> None:
    """Six panels: input (C, H, W), truth and prediction (H, W) class maps, P(class 1) from the
    (K, H, W) probabilities, errors, weights."""
    from matplotlib.figure import Figure

    errors = np.zeros(label.shape + (3,), dtype=np.float32)
    errors[(prediction != label) & (label == 0)] = (1, 0.2, 0.2)  # predicted foreground on background: red
    errors[(prediction != label) & (label != 0)] = (0.2, 0.4, 1)  # missed foreground: blue
    panels = [
        ("input", display_image(image), "gray"),
        ("ground truth", label, "viridis"),
        ("prediction", prediction, "viridis"),
        ("P(class 1)", probability[1], "magma"),
        ("errors (red: false 1, blue: missed 1)", errors, None),
        ("weight map", weight, "inferno"),
    ]
    figure = Figure(figsize=(18, 3.6))
    for index, (name, data, colormap) in enumerate(panels):
        axis = figure.add_subplot(1, len(panels), index + 1)
        shown = axis.imshow(data, cmap=colormap, interpolation="nearest")
        if name in ("P(class 1)", "weight map"):
            figure.colorbar(shown, ax=axis, fraction=0.046)
        axis.set_title(name, fontsize=9)
        axis.axis("off")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def display_image(image: np.ndarray) -> np.ndarray:
    """(C, H, W) normalised image -> (H, W) or (H, W, 3) in [0, 1] for imshow."""
    shown = image[0] if image.shape[0] == 1 else np.moveaxis(image[:3], 0, -1)
    return (shown - shown.min()) / max(float(shown.max() - shown.min()), 1e-12)


def whole_image_batch(
    model, image: Tensor, label: Tensor, weight: Tensor, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """One whole image as a batch the network takes in one pass, for the gradient diagnostics.

    Returns the mirrored image ``(1, C, H', W')`` (``preprocess.pad_for_model``: the output's pixel (i, j)
    lies over the image's) and the label and weight map ``(1, h, w)`` at the output's size, the weight
    0 beyond the image so that the loss counts the image's pixels only.
    """
    padded = torch.from_numpy(pad_for_model(image.numpy(), model.depth, model.padding))[None]
    out_height, out_width = (model.output_size(side) for side in padded.shape[-2:])
    height, width = label.shape
    full_label = torch.zeros(1, out_height, out_width, dtype=torch.int64)
    full_weight = torch.zeros(1, out_height, out_width)
    full_label[0, :height, :width], full_weight[0, :height, :width] = label, weight
    return padded.to(device), full_label.to(device), full_weight.to(device)


def _model_loss(
    model: nn.Module, image: Tensor, label: Tensor, weight: Tensor | None, loss_kind: str, input_requires_grad: bool
) -> tuple[Tensor, Tensor]:
    """Run ``model`` on ``image`` and return ``(loss, network input)``; the model must already be in eval mode.

    The input is a detached copy on the model's device and in its dtype (so a float64 model accepts a
    float32 image); with ``input_requires_grad`` it is a leaf that ``torch.autograd.grad`` can target.
    """
    parameter = next(model.parameters())
    x = image.detach().to(parameter.device, parameter.dtype).requires_grad_(input_requires_grad)
    target = label.to(parameter.device, torch.int64)
    weight_map = None if weight is None else weight.to(parameter.device)
    return segmentation_loss(loss_kind, model(x), target, weight_map), x


def input_saliency(
    model: nn.Module, image: Tensor, label: Tensor, weight: Tensor | None = None, loss_kind: str = "ce"
) -> Tensor:
    """Saliency map: how strongly the loss reacts to each input pixel (Simonyan et al., 2014).

    Parameters
    ----------
    model : model.UNet
        Run in eval mode; its train/eval flags are restored and its parameters' ``.grad`` untouched.
    image : Tensor, shape (1, C, H, W), float
        A valid network input (see ``model.valid_input_sizes``). Moved to the model's device and dtype.
    label : Tensor, shape (1, H', W'), integer class indices
        Either the labels of the whole input (H' = H, W' = W, as ``dataset.TileDataset`` gives them,
        which with padding 0 the loss centre-crops to the output) or the labels of the output only
        (H', W' = the output size).
    weight : Tensor, shape (1, H', W'), float, or None
        Per-pixel loss weights on the same grid as ``label``; None weighs every pixel 1.
    loss_kind : {"ce", "dice", "ce+dice"}
        The loss, as ``losses.segmentation_loss``.

    Returns
    -------
    Tensor, shape (H, W), the model's dtype, on the CPU
        ``max_c |d loss / d image[0, c]|``: the absolute gradient of the loss with respect to the
        input, maximised over the channels. Loss units per intensity unit; pixels outside the
        receptive field of every labelled output pixel are 0.
    """
    with evaluating(model):
        loss, x = _model_loss(model, image, label, weight, loss_kind, input_requires_grad=True)
        (gradient,) = torch.autograd.grad(loss, x)
    return gradient[0].abs().amax(dim=0).cpu()


def layer_gradient_norms(
    model: nn.Module, image: Tensor, label: Tensor, weight: Tensor | None = None, loss_kind: str = "ce"
) -> list[tuple[str, float, float]]:
    """L2 norms of the loss gradient and of the value of every trainable parameter tensor.

    Parameters
    ----------
    model, image, label, weight, loss_kind
        As in ``input_saliency``. The gradients are those of the eval-mode network (BatchNorm with its
        running statistics, no dropout), so that the call changes no running statistic; for a trained
        network they are close to a training step's, for a freshly initialised one they can differ.

    Returns
    -------
    list of (name, gradient norm, weight norm)
        One entry per parameter with ``requires_grad``, in ``model.named_parameters()`` order (the
        network's order: encoder, bottleneck, decoder, output layer). Both norms are Python floats,
        the Frobenius norm of the whole tensor; a parameter the loss does not reach gets gradient 0.0.
        Parameters' ``.grad`` are not touched.
    """
    named = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    with evaluating(model):
        loss, _ = _model_loss(model, image, label, weight, loss_kind, input_requires_grad=False)
        gradients = torch.autograd.grad(loss, [parameter for _, parameter in named], allow_unused=True)
    return [
        (
            name,
            0.0 if gradient is None else float(torch.linalg.norm(gradient)),
            float(torch.linalg.norm(parameter.detach())),
        )
        for (name, parameter), gradient in zip(named, gradients)
    ]


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


def _default_activation_layers(model: nn.Module) -> list[str]:
    """The outputs of ``inc``, every ``downs.i``, ``bottleneck`` and every ``ups.i`` of a UNet, in network order."""
    return [
        "inc",
        *(f"downs.{index}" for index in range(len(model.downs))),
        "bottleneck",
        *(f"ups.{index}" for index in range(len(model.ups))),
    ]


def activation_maps(
    model: nn.Module, image: Tensor, layers: Sequence[str] | None = None, channels: int = 8
) -> dict[str, Tensor]:
    """Feature maps of named submodules for one image, recorded with forward hooks.

    Parameters
    ----------
    model : model.UNet
        Run once in eval mode without gradients; its train/eval flags are restored and the hooks
        removed, even when the forward pass fails.
    image : Tensor, shape (1, C, H, W), float
        A valid network input; moved to the model's device and dtype.
    layers : sequence of str, optional
        Names from ``model.named_modules()``, e.g. ``"inc"``, ``"downs.0"``, ``"ups.1.up"``. Default:
        ``inc``, each ``downs.i``, ``bottleneck`` and each ``ups.i``, in network order.
    channels : int, optional
        How many channels to keep per layer (the first ones).

    Returns
    -------
    dict of str to Tensor
        In the order of ``layers``: each module's output for batch item 0, channels
        ``0 .. min(channels, C_layer) - 1``, shape (min(channels, C_layer), h, w), the model's dtype,
        a copy on the CPU.

    Raises
    ------
    ValueError
        If a name is not a submodule (the message lists the top- and second-level module names) or
        names one that the forward pass does not call, such as the ``nn.ModuleList`` ``downs``.
    """
    modules = dict(model.named_modules())
    layers = _default_activation_layers(model) if layers is None else list(layers)
    unknown = [name for name in layers if not name or name not in modules]
    if unknown:
        # Containers are left out: a ModuleList is never called, so a hook on it would never fire.
        available = [
            name
            for name, module in modules.items()
            if name and name.count(".") <= 1 and not isinstance(module, (nn.ModuleList, nn.ModuleDict))
        ]
        raise ValueError(f"unknown layer(s) {', '.join(map(repr, unknown))}; available: {', '.join(available)}")

    recorded: dict[str, Tensor] = {}

    def recorder(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            # A copy: later in-place operations (ReLU(inplace=True)) may overwrite the output tensor.
            recorded[name] = output[0, :channels].detach().to("cpu", copy=True)

        return hook

    handles = [modules[name].register_forward_hook(recorder(name)) for name in layers]
    parameter = next(model.parameters())
    try:
        with evaluating(model), torch.no_grad():
            model(image.to(parameter.device, parameter.dtype))
    finally:
        for handle in handles:
            handle.remove()
    silent = [name for name in layers if name not in recorded]
    if silent:
        raise ValueError(
            f"layer(s) {', '.join(map(repr, silent))} did not run in the forward pass "
            "(containers such as nn.ModuleList are never called themselves; name their items, e.g. 'downs.0')"
        )
    return {name: recorded[name] for name in layers}


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
