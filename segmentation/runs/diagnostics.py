"""Diagnostics of a trained model on annotated images: scores, masks, saliency, gradient norms and activations.

``diagnose`` writes, for each test (or validation) image, its mask and a figure of input, truth,
prediction, probability, errors and weight map, and the saliency (the gradient of the loss with respect
to the input); for the first image the per-layer gradient and weight norms and activation maps; and it
prints the scores of the masks as written. The functions behind the figures are checked against
finite differences and hand-computed gradients in the tests; the figures themselves are drawn by
``segmentation.runs.figures``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import skimage.io
import tifffile
import torch
from torch import Tensor, nn

from dataset import WholeImageDataset
from losses import IGNORE_LABEL, scored_classes, segmentation_loss
from segmentation.console import note
from segmentation.data.preprocess import network_margin, pad_for_model
from segmentation.inference.infer import Predictor, evaluating, uniform_prediction_note
from segmentation.inference.predict import mask_image
from segmentation.metrics import (
    image_scores,
    matching_scores,
    object_matching,
    pool_scores,
    segmentation_scores,
)
from segmentation.runs.figures import (
    save_activation_figure,
    save_gradient_norm_figure,
    save_prediction_figure,
    save_saliency_figure,
)


def diagnose(
    predictor: Predictor,
    dataset: WholeImageDataset,
    split: str,
    loss_kind: str,
    output: Path,
    layers: list[str] | None = None,
    instances: bool = False,
) -> dict[str, float]:
    """Masks, figures and a printed table of scores for every image of ``dataset`` (the ``test`` or
    ``val`` images, as ``split`` names them), predicted and decided by ``predictor``; returns the
    overall scores. The scores are those of the masks written to ``output/masks``; with two classes
    also the F1 at IoU 0.5 of the predicted objects (``predictor.objects``) against the true ones per
    image, and stardist's matching fields over all images (``matching_line``), and with ``instances``
    their ids as ``masks/<name>_instances.tif``. ``loss_kind`` (``train.loss``) is the
    loss whose gradients the saliency and gradient-norm figures show."""
    num_classes = predictor.model.num_classes
    (output / "masks").mkdir(parents=True, exist_ok=True)
    total = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    cell_scores, objects, uniform = [], np.zeros(4), []
    images = "test images" if split == "test" else "validation images"
    threshold = f", class 1 at probability >= {predictor.threshold:.2f}" if num_classes == 2 else ""
    print(f"{len(dataset)} {images}{threshold}")
    columns = score_columns(num_classes)
    print(table_line("image", None, columns))
    for index, (image, label, weight) in enumerate(dataset):
        probabilities = predictor.probabilities(image.to(predictor.device)).cpu()
        name = dataset.names[index]
        found = predictor.objects(probabilities) if num_classes == 2 else None
        classes = predictor.classes(probabilities, found).numpy()
        suffix = ".tif" if classes.ndim == 3 else ".png"  # a volume's mask: a stack of its sections
        written = write_mask(output / "masks" / f"{Path(name).stem}{suffix}", classes, num_classes)
        label = scored_classes(label, num_classes)  # the boundary class, where the network has it, is its object's
        confusion, cells = image_scores(torch.from_numpy(written), label, num_classes)
        total += confusion
        scores = {**segmentation_scores(confusion), **(cells or {})}
        if cells:
            cell_scores.append(cells)
        if found is not None:
            matched = object_matching(dataset.images[index].instances(), in_annotation(found, label.numpy()))
            objects += matched
            scores["object_f1"] = matching_scores(matched)["f1"]
            if instances:
                path = output / "masks" / f"{Path(name).stem}_instances.tif"
                tifffile.imwrite(
                    path, found.astype(np.uint16 if found.max() < 2**16 else np.uint32), photometric="minisblack"
                )
        if len(np.unique(written)) == 1:
            uniform.append(name)
        print(table_line(name, scores, columns))
        figures = (output, split, index, name)
        shown = predictor.class_probabilities(probabilities)  # the user's classes, the border in its object
        item = (image, label, weight)
        spacing = predictor.plan.spacing
        aspect = 1.0 if spacing is None else spacing[0] / spacing[-1]  # a section's thickness in pixel widths
        save_image_figures(predictor.model, loss_kind, figures, item, classes, shown, scores, layers, aspect)
    overall = pool_scores(total, cell_scores)
    if num_classes == 2:
        overall.update({f"object_{key}": value for key, value in matching_scores(objects).items()})
    print(table_line("all", overall, columns))
    if num_classes == 2:
        print(matching_line(objects))
        print(
            "(Rand error and VI: on the 4-connected components of class 1 in the masks, foreground-restricted; "
            "means over images. Objects: the true ids against the predicted objects, matched at IoU > 0.5)"
        )
    unannotated = sum(image.unannotated for image in dataset.images)
    if unannotated:
        pixels = sum(image.shape[0] * image.shape[1] for image in dataset.images)
        print(
            f"(scored on the annotated pixels alone, {100 * (1 - unannotated / pixels):.1f} % of the pixels "
            "(train.ignore_value); predicted objects mostly on unannotated pixels are left out of the matching)"
        )
    if uniform:
        note(uniform_prediction_note(uniform, len(dataset), images))
    print(
        f"masks: {output}/masks/; figures: {output}/{split}_*.png, saliency_*.png, gradient_norms.png, activations.png"
    )
    return overall


def in_annotation(objects: np.ndarray, label: np.ndarray) -> np.ndarray:
    """(H, W) ``objects`` (ids, 0 none) without those whose pixels lie mostly where ``label`` is not annotated
    (``losses.IGNORE_LABEL``): nobody said whether they are right, so they are neither hits nor misses."""
    given = label != IGNORE_LABEL
    if given.all():
        return objects
    inside = np.bincount(objects[given].ravel(), minlength=objects.max() + 1)
    every = np.bincount(objects.ravel(), minlength=objects.max() + 1)
    outside = 2 * inside < every
    outside[0] = False
    return np.where(outside[objects], 0, objects)


MATCHING_FIELDS = {  # matching_scores' keys, as the line names them
    "precision": "precision",
    "recall": "recall",
    "accuracy": "accuracy",
    "f1": "f1",
    "mean_matched_score": "mean matched IoU",
    "panoptic_quality": "panoptic quality",
}


def matching_line(counts: np.ndarray) -> str:
    """stardist's matching fields at IoU 0.5 of ``object_matching`` counts summed over images, as one line."""
    scores = matching_scores(counts)
    named = ", ".join(f"{label} {scores[key]:.4f}" for key, label in MATCHING_FIELDS.items())
    matched, true_objects, predicted_objects = int(counts[0]), int(counts[1]), int(counts[2])
    return f"objects at IoU 0.5: {matched} of {true_objects} true and {predicted_objects} predicted matched; {named}"


def write_mask(path: Path, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Write the mask of (H, W) ``classes`` (``predict.mask_image``; a volume's (D, H, W) as a TIFF stack of
    its sections) and read it back as class indices: scores are those of the file, which is what a user would
    submit."""
    if classes.ndim == 3:
        tifffile.imwrite(path, mask_image(classes, num_classes), photometric="minisblack", imagej=True)
        written = tifffile.imread(path).astype(np.int64)
    else:
        skimage.io.imsave(path, mask_image(classes, num_classes), check_contrast=False)
        written = skimage.io.imread(path).astype(np.int64)
    return written // 255 if num_classes == 2 else written


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
    loss_kind: str,
    where: tuple[Path, str, int, str],
    item: tuple,
    classes: np.ndarray,
    probabilities: Tensor,
    scores: dict,
    layers: list[str] | None,
    aspect: float = 1.0,
) -> None:
    """The figures of one image (``where``: output folder, split, index and name; ``item``: image,
    label and weight map): prediction panels and saliency; for the first image also the per-layer
    gradient and weight norms and the activation maps. Volumes: orthogonal views, z stretched by ``aspect``."""
    output, split, index, name = where
    image, label, weight = item
    title = f"{name}: pixel error {scores['pixel_error']:.4f}, Dice {scores['dice']:.4f}"
    panels = (image.numpy(), label.numpy(), classes, probabilities.numpy(), weight.numpy())
    save_prediction_figure(output / f"{split}_{index:03d}.png", *panels, title, aspect)
    device = next(model.parameters()).device
    whole = whole_image_batch(model, image, label, weight, device)
    saliency = input_saliency(model, *whole, loss_kind)
    axes = [model.axis(axis) for axis in range(label.ndim)] if label.ndim == 3 else [(None, None)] * 2
    margins = [network_margin(model.depth, model.padding, *along) for along in axes]
    saliency = saliency[tuple(slice(margin, margin + side) for margin, side in zip(margins, label.shape))]
    path = output / f"saliency_{index:03d}.png"
    save_saliency_figure(path, image.numpy(), saliency.cpu(), title=f"{name}: |d loss / d input|")
    if index == 0:
        norms = layer_gradient_norms(model, *whole, loss_kind)
        save_gradient_norm_figure(output / "gradient_norms.png", norms, title=f"per-layer norms on {name}")
        maps = activation_maps(model, whole[0], layers)
        save_activation_figure(output / "activations.png", maps, title=f"activations on {name}")


def whole_image_batch(
    model, image: Tensor, label: Tensor, weight: Tensor, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """One whole image as a batch the network takes in one pass, for the gradient diagnostics.

    Returns the mirrored image ``(1, C, H', W')`` (``preprocess.pad_for_model``: the output's pixel (i, j)
    lies over the image's) and the label and weight map ``(1, h, w)`` at the output's size, the weight
    0 beyond the image so that the loss counts the image's pixels only.
    """
    axes = [model.axis(axis) for axis in range(label.ndim)] if label.ndim == 3 else None  # a volume's geometry
    padded = torch.from_numpy(pad_for_model(image.numpy(), model.depth, model.padding, axes))[None]
    spatial = padded.shape[2:]
    outputs = [model.output_size(side, axis - len(spatial)) for axis, side in enumerate(spatial)]
    full_label = torch.zeros(1, *outputs, dtype=torch.int64)
    full_weight = torch.zeros(1, *outputs)
    inside = (0, *(slice(0, side) for side in label.shape))
    full_label[inside], full_weight[inside] = label, weight
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
