"""Look at what a trained U-Net does on the validation images: figures and a table of scores.

    python test.py [--checkpoint PATH] [--config PATH] [--output DIR] [--show] [section.key=value ...]

Without ``--checkpoint`` it takes the newest ``best.pt`` under the config's ``train.save_path``. The
config comes from the checkpoint (so the model and the validation split are the ones of training)
unless ``--config`` is given. For each validation image it saves a figure with the input, the ground
truth, the prediction, the class-1 probability, the errors and the weight map, by default to
``<log_path>/<run>/predictions/``, and prints pixel error, Dice and IoU per image and overall.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from config import ConfigError, UserError, load_config, merge_overrides, resolve
from dataset import build_datasets, network_margin
from metrics import confusion_matrix, segmentation_scores
from training import DEFAULT_CONFIG, build_model, check_architecture, note, read_checkpoint, resolve_device


def find_checkpoint(save_path: Path) -> Path:
    """The newest ``best.pt`` under ``save_path/<run>/``."""
    candidates = sorted(save_path.glob("*/best.pt"), key=lambda path: path.stat().st_mtime)
    if not candidates:
        raise UserError(f"no checkpoint found: looked for {save_path}/*/best.pt; train first (python training.py) or pass --checkpoint PATH")
    return candidates[-1]


def save_prediction_figure(path: Path, image: np.ndarray, label: np.ndarray, probability: np.ndarray, weight: np.ndarray, title: str) -> None:
    """Six panels: input (C, H, W), truth and prediction (H, W) class maps, P(class 1), errors, weights."""
    from matplotlib.figure import Figure

    prediction = probability.argmax(0)
    errors = np.zeros(label.shape + (3,), dtype=np.float32)
    errors[(prediction != label) & (label == 0)] = (1, 0.2, 0.2)  # predicted foreground on background: red
    errors[(prediction != label) & (label != 0)] = (0.2, 0.4, 1)  # missed foreground: blue
    shown = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
    shown = (shown - shown.min()) / max(float(shown.max() - shown.min()), 1e-12)
    panels = [
        ("input", shown, "gray"),
        ("ground truth", label, "viridis"),
        ("prediction", prediction, "viridis"),
        ("P(class 1)", probability[1], "magma"),
        ("errors (red: false 1, blue: missed 1)", errors, None),
        ("weight map", weight, "inferno"),
    ]
    figure = Figure(figsize=(18, 3.6))
    for index, (name, data, colormap) in enumerate(panels):
        axis = figure.add_subplot(1, len(panels), index + 1)
        shown_image = axis.imshow(data, cmap=colormap, interpolation="nearest")
        if name in ("P(class 1)", "weight map"):
            figure.colorbar(shown_image, ax=axis, fraction=0.046)
        axis.set_title(name, fontsize=9)
        axis.axis("off")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


@torch.inference_mode()
def predict_validation(model: torch.nn.Module, dataset, device: torch.device) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """``(padded image, label, class probabilities (K, H, W), weight map)`` for each whole validation image."""
    model.eval()
    results = []
    for index in range(len(dataset)):
        image, label, weight = dataset[index]
        logits = model(image[None].to(device))[0, :, : label.shape[0], : label.shape[1]]
        results.append((image.numpy(), label.numpy(), logits.softmax(0).float().cpu().numpy(), weight.numpy()))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Predictions and scores of a trained U-Net on the validation images.")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint (default: the newest best.pt under train.save_path)")
    parser.add_argument("--config", type=Path, help="config to use instead of the one stored in the checkpoint")
    parser.add_argument("--output", type=Path, help="folder for the figures (default: <log_path>/<run>/predictions)")
    parser.add_argument("--show", action="store_true", help="also show the figures on screen")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.device=cpu")
    args = parser.parse_args(argv)
    try:
        notices: list[str] = []
        if args.checkpoint is None:
            search_config = load_config(args.config or DEFAULT_CONFIG, args.overrides)
            args.checkpoint = find_checkpoint(Path(search_config["train"]["save_path"]))
        state = read_checkpoint(args.checkpoint)
        if args.config:
            config = load_config(args.config, args.overrides, notices)
        else:
            config = resolve(merge_overrides(state["config"], args.overrides), notices)
        for message in notices:
            note(message)
        check_architecture(state, config, args.checkpoint)
        device = resolve_device(config["train"]["device"])
        model = build_model(config["unet"]).to(device)
        model.load_state_dict(state["model"])
        data = build_datasets(config, note)
    except UserError as error:
        prefix = "config error" if isinstance(error, ConfigError) else "error"
        for line in str(error).splitlines():
            print(f"{prefix}: {line}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1

    run_name = state["progress"].get("run_name") or args.checkpoint.parent.name
    output = args.output or Path(config["train"]["log_path"]) / run_name / "predictions"
    output.mkdir(parents=True, exist_ok=True)
    margin = network_margin(len(config["unet"]["input_channels"]), config["unet"]["padding"])
    num_classes = config["unet"]["num_classes"]
    total = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    print(f"{args.checkpoint} (epoch {state['progress']['epoch']}) on {len(data['val'])} validation images")
    print(f"{'image':>8} {'pixel error':>12} {'Dice':>8} {'IoU':>8}")
    figures = []
    for index, (image, label, probability, weight) in enumerate(predict_validation(model, data["val"], device)):
        height, width = label.shape
        confusion = confusion_matrix(torch.from_numpy(probability.argmax(0)), torch.from_numpy(label), num_classes)
        total += confusion
        scores = segmentation_scores(confusion)
        print(f"{index:>8} {scores['pixel_error']:>12.4f} {scores['dice']:>8.4f} {scores['iou']:>8.4f}")
        path = output / f"val_{index:03d}.png"
        crop = image[:, margin : margin + height, margin : margin + width]
        title = f"validation image {index}: pixel error {scores['pixel_error']:.4f}, Dice {scores['dice']:.4f}"
        save_prediction_figure(path, crop, label, probability, weight, title)
        figures.append(path)
    scores = segmentation_scores(total)
    print(f"{'all':>8} {scores['pixel_error']:>12.4f} {scores['dice']:>8.4f} {scores['iou']:>8.4f}")
    print(f"figures: {output}/val_*.png")
    if args.show:
        import matplotlib.image
        import matplotlib.pyplot as plt

        for path in figures:
            plt.figure(figsize=(18, 3.6))
            plt.imshow(matplotlib.image.imread(path))
            plt.axis("off")
        plt.show()
    return 0


if __name__ == "__main__":
    sys.exit(main())
