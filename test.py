"""Use and inspect a trained U-Net: predict masks for new images, or look at its validation diagnostics.

    python test.py --input FILE|DIR|STACK.tif --output DIR [--probabilities] [--overlay] [--tta]
    python test.py [--split test|val] [--show] [--layers inc]  # masks, scores and diagnostics on held-out images
    python test.py --export model.onnx                          # ONNX with dynamic height and width

Common options: ``--checkpoint PATH`` (default: the newest ``best.pt`` under ``train.save_path``),
``--config PATH`` (default: the config stored in the checkpoint), and ``section.key=value`` overrides
such as ``train.device=cpu`` or ``predict.tile_size=572``.

With ``--input``, each image gets a mask of the same name in ``--output``: for two classes a 0/255 PNG
(255 = class 1; for ISBI 2012 this is the challenge's label convention), for more classes a PNG of
class indices; a multi-page TIFF gives a multi-page TIFF. ``--probabilities`` adds float32 TIFFs of the
class-1 probability, ``--overlay`` colour overlays on the input.

Without ``--input``, for each test image (``train.test_images``; else each validation image, or choose
with ``--split``) it writes the mask to ``masks/`` and scores it, and saves a figure with input,
ground truth, prediction, probability, errors and weight map, the saliency (gradient of the loss
with respect to the input), and for the first image a plot of per-layer gradient and weight norms
and the activation maps of chosen layers; it prints the scores, as training computed them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import skimage.io
import tifffile
import torch
from torch import Tensor, nn

from config import ConfigError, UserError, load_config, merge_overrides, resolve
from dataset import IMAGE_SUFFIXES, build_datasets, image_files, network_margin, normalize_image, pad_for_model, read_image
from infer import evaluating, predict_with_config, predicted_classes
from losses import segmentation_loss
from metrics import image_scores, pool_scores, segmentation_scores
from training import DEFAULT_CONFIG, build_model, check_architecture, note, read_checkpoint, resolve_device

OVERLAY_COLOURS = np.array([(0, 0, 0), (255, 60, 60), (60, 160, 255), (80, 220, 80), (255, 200, 40), (200, 80, 255)], dtype=np.float32)


def find_checkpoint(save_path: Path) -> Path:
    """The newest ``best.pt`` under ``save_path/<run>/``."""
    candidates = sorted(save_path.glob("*/best.pt"), key=lambda path: path.stat().st_mtime)
    if not candidates:
        raise UserError(f"no checkpoint found: looked for {save_path}/*/best.pt; train first (python training.py) or pass --checkpoint PATH")
    return candidates[-1]


def load_model(checkpoint: Path | None, config_path: Path | None, overrides: list[str]) -> tuple[torch.nn.Module, dict, dict, torch.device]:
    """``(model on its device, config, checkpoint contents, device)`` for the chosen checkpoint."""
    if checkpoint is None:
        checkpoint = find_checkpoint(Path(load_config(config_path or DEFAULT_CONFIG, overrides)["train"]["save_path"]))
    state = read_checkpoint(checkpoint)
    notices: list[str] = []
    config = load_config(config_path, overrides, notices) if config_path else resolve(merge_overrides(state["config"], overrides), notices)
    for message in notices:
        note(message)
    check_architecture(state, config, checkpoint)
    device = resolve_device(config["train"]["device"])
    model = build_model(config["unet"]).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    state["path"] = checkpoint
    return model, config, state, device


# ---------------------------------------------------------------------------------------------------
# Predicting masks for new images
# ---------------------------------------------------------------------------------------------------


def input_images(path: Path) -> list[Path]:
    """The image files named by ``--input``: one file, or every image of a folder."""
    if path.is_dir():
        return image_files(path)
    if not path.is_file():
        raise UserError(f"--input {path}: no such file or folder")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"--input {path}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
    return [path]


def image_slices(path: Path, channels: int) -> tuple[list[np.ndarray], bool]:
    """``(images, is_stack)``: the pages of a multi-page TIFF, or the one image of any other file."""
    pixels = read_image(path)
    stack = False
    if path.suffix.lower() in (".tif", ".tiff"):
        with tifffile.TiffFile(path) as tiff:
            stack = len(tiff.pages) > 1  # a page per slice; (3, H, W) alone could be one RGB image
    images = list(pixels) if stack else [pixels]
    for image in images:
        found = 1 if image.ndim == 2 else min(image.shape[0], image.shape[-1])  # channels first or last
        if found not in (1, 3, 4):
            raise UserError(f"{path}: an image of {found} channels; the model takes {channels} (unet.image_channels)")
        if found != channels and not (found == 4 and channels == 3):
            note(f"{path.name} has {found} channel(s), the model takes {channels}: converting it as training does")
    return images, stack


def decision_threshold(config: dict, state: dict) -> float:
    """``predict.threshold``: a number as given, or for ``auto`` the one calibrated after training and
    stored in the checkpoint (0.5 with a notice when there is none)."""
    threshold = config["predict"]["threshold"]
    if threshold != "auto":
        return threshold
    if "threshold" not in state:
        note(f"predict.threshold=auto but {state['path']} holds no calibrated threshold (it is stored at the end of training): using 0.5")
    return state.get("threshold", 0.5)


def mask_image(classes: np.ndarray, num_classes: int = 2) -> np.ndarray:
    """(H, W) uint8 mask of (H, W) class indices (``infer.predicted_classes``): 0/255 for two classes
    (255 = class 1), else the class indices."""
    return (classes * 255 if num_classes == 2 else classes).astype(np.uint8)


def overlay_image(image: np.ndarray, classes: np.ndarray, opacity: float = 0.45) -> np.ndarray:
    """(H, W, 3) uint8: the input in gray or colour with each predicted class > 0 tinted in its colour."""
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels if pixels.ndim == 3 and pixels.shape[-1] >= 3 else np.repeat(pixels.reshape(pixels.shape[:2] + (1,)), 3, axis=-1)
    pixels = pixels[..., :3]
    pixels = 255 * (pixels - pixels.min()) / max(float(pixels.max() - pixels.min()), 1e-12)
    colours = OVERLAY_COLOURS[classes % len(OVERLAY_COLOURS)]
    tint = (classes > 0)[..., None]
    return np.where(tint, (1 - opacity) * pixels + opacity * colours, pixels).astype(np.uint8)


def predict_files(model, config: dict, inputs: list[Path], output: Path, probabilities: bool, overlay: bool, tta: bool, device: torch.device, threshold: float = 0.5) -> list[Path]:
    """Write a mask (and optionally probabilities and an overlay) for every input; returns the masks."""
    predict, channels = config["predict"], config["unet"]["image_channels"]
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for path in inputs:
        images, stack = image_slices(path, channels)
        suffix = ".tif" if stack or path.suffix.lower() in (".tif", ".tiff") else ".png"
        mask_path = output / (path.stem + suffix)
        if mask_path.resolve() == path.resolve():
            raise UserError(f"--output {output}: the mask would overwrite its input {path}; choose another folder")
        masks, cell_probabilities = [], []
        for index, image in enumerate(images):
            normalized = torch.from_numpy(normalize_image(image, channels)).to(device)
            result = predict_with_config(model, normalized, config, tta)
            classes = predicted_classes(result, threshold, predict["watershed_seeds"]).numpy()
            masks.append(mask_image(classes, result.shape[0]))
            cell_probabilities.append(result[1 if result.shape[0] > 1 else 0].numpy().astype(np.float32))
            if overlay:
                name = f"{path.stem}_{index:03d}_overlay.png" if stack else f"{path.stem}_overlay.png"
                skimage.io.imsave(output / name, overlay_image(image, classes), check_contrast=False)
        if suffix == ".tif":
            tifffile.imwrite(mask_path, np.stack(masks) if stack else masks[0], photometric="minisblack")
        else:
            skimage.io.imsave(mask_path, masks[0], check_contrast=False)
        if probabilities:
            tifffile.imwrite(output / f"{path.stem}_probability.tif", np.stack(cell_probabilities) if stack else cell_probabilities[0], photometric="minisblack")
        written.append(mask_path)
        print(f"{path} -> {mask_path}" + (f" ({len(images)} slices)" if stack else ""))
    return written


# ---------------------------------------------------------------------------------------------------
# Diagnostics on the validation images
# ---------------------------------------------------------------------------------------------------


def save_prediction_figure(path: Path, image: np.ndarray, label: np.ndarray, prediction: np.ndarray, probability: np.ndarray, weight: np.ndarray, title: str) -> None:
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


def whole_image_batch(model, image: Tensor, label: Tensor, weight: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """One whole image as a batch the network takes in one pass, for the gradient diagnostics.

    Returns the mirrored image ``(1, C, H', W')`` (``dataset.pad_for_model``: the output's pixel (i, j)
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


def diagnostics(model, config: dict, device: torch.device, output: Path, layers: list[str] | None, tta: bool, split: str | None = None, threshold: float = 0.5) -> dict[str, float]:
    """Masks, figures and a printed table of scores for every image of ``split`` (``test``: the images
    of ``train.test_images``; ``val``: the validation images; default: test when there are test images);
    returns the overall scores. The scores are those of the masks written to ``output/masks``."""
    data = build_datasets(config, note)
    split = split or ("test" if data["test"] is not None else "val")
    if data[split] is None:
        raise UserError("--split test: the config sets no train.test_images; use --split val, or train with train.test_images=[...]")
    dataset = data[split]
    predict, num_classes = config["predict"], config["unet"]["num_classes"]
    (output / "masks").mkdir(parents=True, exist_ok=True)
    total = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    cell_scores = []
    print(f"{len(dataset)} {'test' if split == 'test' else 'validation'} images" + (f", class 1 at probability >= {threshold:.2f}" if num_classes == 2 else ""))
    header = f"{'image':>24} {'pixel error':>12} {'Dice':>8} {'IoU':>8}" + (f" {'Rand error':>11} {'VI':>8}" if num_classes == 2 else "")
    print(header)
    for index, (image, label, weight) in enumerate(dataset):
        probabilities = predict_with_config(model, image.to(device), config, tta).cpu()
        mask_path = output / "masks" / f"{Path(dataset.names[index]).stem}.png"
        classes = predicted_classes(probabilities, threshold, predict["watershed_seeds"]).numpy()
        skimage.io.imsave(mask_path, mask_image(classes, num_classes), check_contrast=False)
        # score the mask as written: the file is what a user would submit
        written = torch.from_numpy(skimage.io.imread(mask_path).astype(np.int64))
        confusion, cells = image_scores(written // 255 if num_classes == 2 else written, label, num_classes)
        total += confusion
        scores = segmentation_scores(confusion)
        line = f"{dataset.names[index]:>24} {scores['pixel_error']:>12.4f} {scores['dice']:>8.4f} {scores['iou']:>8.4f}"
        if cells:
            cell_scores.append(cells)
            line += f" {cells['rand_error']:>11.4f} {cells['vi']:>8.4f}"
        print(line)
        title = f"{dataset.names[index]}: pixel error {scores['pixel_error']:.4f}, Dice {scores['dice']:.4f}"
        save_prediction_figure(output / f"{split}_{index:03d}.png", image.numpy(), label.numpy(), classes, probabilities.numpy(), weight.numpy(), title)
        whole = whole_image_batch(model, image, label, weight, device)
        saliency = input_saliency(model, *whole, config["train"]["loss"])
        margin = network_margin(model.depth, model.padding)
        saliency = saliency[margin : margin + label.shape[0], margin : margin + label.shape[1]]
        save_saliency_figure(output / f"saliency_{index:03d}.png", image.numpy(), saliency.cpu(), title=f"{dataset.names[index]}: |d loss / d input|")
        if index == 0:
            norms = layer_gradient_norms(model, *whole, config["train"]["loss"])
            save_gradient_norm_figure(output / "gradient_norms.png", norms, title=f"per-layer norms on {dataset.names[0]}")
            save_activation_figure(output / "activations.png", activation_maps(model, whole[0], layers), title=f"activations on {dataset.names[0]}")
    overall = pool_scores(total, cell_scores)
    line = f"{'all':>24} {overall['pixel_error']:>12.4f} {overall['dice']:>8.4f} {overall['iou']:>8.4f}"
    if cell_scores:
        line += f" {overall['rand_error']:>11.4f} {overall['vi']:>8.4f}"
    print(line)
    if num_classes == 2:
        print("(Rand error and VI: on the 4-connected components of class 1 in the masks, foreground-restricted; means over images)")
    print(f"masks: {output}/masks/; figures: {output}/{split}_*.png, saliency_*.png, gradient_norms.png, activations.png")
    return overall


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


def save_saliency_figure(path: str | Path, image: np.ndarray | Tensor, saliency: np.ndarray | Tensor, title: str = "") -> None:
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
        saliency.detach().cpu().float().numpy() if isinstance(saliency, Tensor) else np.asarray(saliency, dtype=np.float32)
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


# ---------------------------------------------------------------------------------------------------
# ONNX export
# ---------------------------------------------------------------------------------------------------


def _require(package: str, purpose: str) -> ModuleType:
    """Import ``package`` or raise a one-line UserError that says how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise UserError(f"{purpose} needs the {package} package: pip install onnx onnxruntime") from None


def export_onnx(model: nn.Module, path: str | Path, image_channels: int, sample_size: int, opset: int | None = None) -> None:
    """Export ``model`` to ONNX with a dynamic batch size, height and width.

    Parameters
    ----------
    model : model.UNet
        Exported in eval mode (BatchNorm's running statistics and no dropout are baked in); its
        train/eval flags are restored afterwards.
    path : str or Path
        Output ``.onnx`` file.
    image_channels : int
        Channels of the input (``model.image_channels``).
    sample_size : int
        Height and width in px of the square zero input the export traces; any valid input size (see
        ``model.valid_input_sizes``) gives the same file.
    opset : int, optional
        ONNX opset version; None takes the exporter's default (20 with torch 2.13).

    Raises
    ------
    UserError
        If the ``onnx`` package is missing.
    ValueError
        If ``sample_size`` is not a valid input size; the message names the nearest valid ones.

    Notes
    -----
    Uses the TorchScript-based exporter (``dynamo=False``), which needs no onnxscript. It traces the
    network: the shape arithmetic of the crops and upsamplings is recorded as graph operations, so the
    file works for every valid input size, while the Python size checks of ``UNet.forward`` become
    constants. The ONNX model therefore does not check sizes: for an invalid height or width its
    poolings floor odd sizes and its crops trim the skips to fit, so it silently returns a smaller,
    misaligned output where the PyTorch model raises. Feed it valid sizes only. Input ``image``
    (batch, channels, height, width), output ``logits`` (batch, classes, out_height, out_width); both
    in the model's dtype. The file is validated with ``onnx.checker``.
    """
    onnx = _require("onnx", "ONNX export")
    # Check here rather than leave it to UNet.forward: while tracing, sizes are tensors that its size
    # arithmetic changes in place, so its error message would name a wrong size.
    model.output_size(sample_size)
    parameter = next(model.parameters())
    sample = torch.zeros(1, image_channels, sample_size, sample_size, dtype=parameter.dtype, device=parameter.device)
    with evaluating(model), warnings.catch_warnings():
        # The tracer warns at each Python-side size check in UNet.forward; turning those into constants
        # is what we want (see Notes), so the warnings would only bury real messages.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the exporter's notice about dynamo
        torch.onnx.export(
            model,
            (sample,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={
                "image": {0: "batch", 2: "height", 3: "width"},
                "logits": {0: "batch", 2: "out_height", 3: "out_width"},
            },
        )
    onnx.checker.check_model(str(path))


def check_onnx(model: nn.Module, path: str | Path, sample: Tensor) -> float:
    """Largest absolute difference between the ONNX file's output (onnxruntime, CPU) and the model's.

    Parameters
    ----------
    model : model.UNet
        The exported model; run in eval mode without gradients, train/eval flags restored.
    path : str or Path
        ONNX file written by ``export_onnx``.
    sample : Tensor, shape (B, C, H, W), float
        A valid input, of any valid size (not only the exported one). Cast to the model's dtype.

    Returns
    -------
    float
        ``max |onnx logits - torch logits|`` in logit units, over the whole (B, K, h, w) output.

    Raises
    ------
    UserError
        If the ``onnxruntime`` package is missing.
    RuntimeError
        If the two outputs differ in shape.
    """
    onnxruntime = _require("onnxruntime", "ONNX check")
    parameter = next(model.parameters())
    sample = sample.detach().to(parameter.device, parameter.dtype)
    with evaluating(model), torch.no_grad():
        expected = model(sample).cpu().numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {session.get_inputs()[0].name: sample.cpu().numpy()})
    if actual.shape != expected.shape:
        raise RuntimeError(f"ONNX output shape {actual.shape} differs from PyTorch's {expected.shape}")
    return float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Predict masks with a trained U-Net, or look at its diagnostics.", epilog="overrides: section.key=value, e.g. train.device=cpu predict.tile_size=572")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint (default: the newest best.pt under train.save_path)")
    parser.add_argument("--config", type=Path, help="config to use instead of the one stored in the checkpoint")
    parser.add_argument("--input", type=Path, help="image file, folder of images, or multi-page TIFF to segment")
    parser.add_argument("--output", type=Path, help="folder for masks or figures (default with --input: predictions/; else <log_path>/<run>/diagnostics)")
    parser.add_argument("--probabilities", action="store_true", help="also write float32 class-1 probability TIFFs")
    parser.add_argument("--overlay", action="store_true", help="also write colour overlays of the prediction on the input")
    parser.add_argument("--tta", action="store_true", help="average over the flips and turns that the training augmentation covered (as predict.tta=true)")
    parser.add_argument("--split", choices=("test", "val"), help="diagnostics on the test images (train.test_images) or the validation images (default: test when there are any)")
    parser.add_argument("--layers", help="comma-separated layers for the activation maps (default: every block)")
    parser.add_argument("--export", type=Path, metavar="MODEL.onnx", help="export the model to ONNX and check it against PyTorch")
    parser.add_argument("--show", action="store_true", help="also show the diagnostic figures on screen")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        model, config, state, device = load_model(args.checkpoint, args.config, args.overrides)
        print(f"{state['path']} (epoch {state['progress']['epoch']}) on {device}")
        if args.export:
            export_onnx(model, args.export, config["unet"]["image_channels"], sample_size=config["train"]["tile_size"])
            difference = check_onnx(model, args.export, torch.randn(1, config["unet"]["image_channels"], config["train"]["tile_size"], config["train"]["tile_size"]))
            print(f"wrote {args.export}; onnxruntime and PyTorch differ by at most {difference:.2e}")
            return 0
        threshold = decision_threshold(config, state)
        if args.input:
            predict_files(model, config, input_images(args.input), args.output or Path("predictions"), args.probabilities, args.overlay, args.tta, device, threshold)
            return 0
        run_name = state["progress"].get("run_name") or state["path"].parent.name
        output = args.output or Path(config["train"]["log_path"]) / run_name / "diagnostics"
        diagnostics(model, config, device, output, args.layers.split(",") if args.layers else None, args.tta, args.split, threshold)
    except UserError as error:
        prefix = "config error" if isinstance(error, ConfigError) else "error"
        for line in str(error).splitlines():
            print(f"{prefix}: {line}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    if args.show:
        import matplotlib.image
        import matplotlib.pyplot as plt

        for path in sorted(output.glob("*.png")):
            plt.figure(figsize=(16, 4))
            plt.imshow(matplotlib.image.imread(path))
            plt.title(path.name)
            plt.axis("off")
        plt.show()
    return 0


if __name__ == "__main__":
    sys.exit(main())
