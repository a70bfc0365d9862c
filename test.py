"""Use and inspect a trained U-Net: predict masks for new images, or look at its validation diagnostics.

    python test.py --input FILE|DIR|STACK.tif --output DIR [--probabilities] [--instances] [--overlay] [--tta]
    python test.py [--split test|val] [--show] [--layers inc]  # masks, scores and diagnostics on held-out images
    python test.py --export model.zip                           # bioimage.io package (deepImageJ, QuPath, napari)
    python test.py --export model.pt | model.onnx               # TorchScript or ONNX alone, any valid size
    python test.py --checkpoint weights/RUN-fold*/best.pt       # each fold's scores, then mean and std

Common options: ``--checkpoint PATH`` (default: the newest ``best.pt`` under ``train.save_path``),
``--config PATH`` (default: the config stored in the checkpoint), and ``section.key=value`` overrides
such as ``train.device=cpu`` or ``predict.tile_size=572``.

With ``--input``, each image gets a mask of the same name in ``--output``: for two classes a 0/255 PNG
(255 = class 1; for ISBI 2012 this is the challenge's label convention), for more classes a PNG of
class indices; a multi-page TIFF gives a multi-page TIFF. ``--probabilities`` adds float32 TIFFs of the
class-1 probability, ``--instances`` uint16 TIFFs of object ids (grown from the insides where the model
has the border class, else the connected components of class 1; cleaned by ``predict.min_object_size``
and ``fill_holes``), ``--overlay`` colour overlays on the input.

Without ``--input``, for each test image (``train.test_images``; else each validation image, or choose
with ``--split``) it writes the mask to ``masks/`` and scores it, and saves a figure with input,
ground truth, prediction, probability, errors and weight map, the saliency (gradient of the loss
with respect to the input), and for the first image a plot of per-layer gradient and weight norms
and the activation maps of chosen layers; it prints the scores, as training computed them. Given
several checkpoints (the folds of ``train.fold=all``), it does so for each on the test images of its own
config, then prints one row per run and the mean and standard deviation of every score.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch

from segmentation.config import UserError
from segmentation.console import note, report_error
from segmentation.device import memory_description
from segmentation.inference.export import check_onnx, export_onnx, export_torchscript, sample_shape
from segmentation.inference.package import export_package
from segmentation.inference.predict import input_images, predict_files
from segmentation.inference.trained import Trained, load_trained
from segmentation.options import OneLineParser, path_argument
from segmentation.runs.diagnostics import diagnose, score_summary


def command_line() -> argparse.ArgumentParser:
    """The command line's options."""
    parser = OneLineParser(
        description="Predict masks with a trained U-Net, or look at its diagnostics.",
        epilog="overrides: section.key=value, e.g. train.device=cpu predict.tile_size=572",
    )
    parser.add_argument(
        "--checkpoint",
        type=path_argument,
        nargs="+",
        help=(
            "checkpoint (default: the newest best.pt under train.save_path); several (e.g. the folds of "
            "train.fold=all): each scored on its own test images, then the mean and standard deviation"
        ),
    )
    parser.add_argument(
        "--config", type=path_argument, help="config to use instead of the one stored in the checkpoint"
    )
    parser.add_argument(
        "--input", type=path_argument, help="image file, folder of images, or multi-page TIFF to segment"
    )
    parser.add_argument(
        "--output",
        type=path_argument,
        help="folder for masks or figures (default with --input: predictions/; else <log_path>/<run>/diagnostics)",
    )
    parser.add_argument("--probabilities", action="store_true", help="also write float32 class-1 probability TIFFs")
    parser.add_argument(
        "--overlay", action="store_true", help="also write colour overlays of the prediction on the input"
    )
    parser.add_argument(
        "--instances",
        action="store_true",
        help=(
            "also write uint16 TIFFs of object ids (grown from the object insides where the model has the "
            "border class, else the connected components of class 1 after predict.watershed_seeds' cut; "
            "cleaned by predict.min_object_size and fill_holes)"
        ),
    )
    parser.add_argument(
        "--tta",
        action="store_true",
        help="average over the flips and turns that the training augmentation covered (as predict.tta=true)",
    )
    parser.add_argument(
        "--split",
        choices=("test", "val"),
        help=(
            "diagnostics on the test images (train.test_images) or the validation images (default: test when "
            "there are any)"
        ),
    )
    parser.add_argument("--layers", help="comma-separated layers for the activation maps (default: every block)")
    parser.add_argument(
        "--export",
        type=path_argument,
        metavar="MODEL.zip|.pt|.onnx",
        help="export the model: a bioimage.io package (.zip: TorchScript, state dict, ONNX, test tensors, README), "
        "TorchScript (.pt) or ONNX (.onnx), each checked against PyTorch",
    )
    parser.add_argument("--show", action="store_true", help="also show the diagnostic figures on screen")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = command_line()
    args = parser.parse_args(argv)
    # --checkpoint takes several paths, so overrides written after it land there: give them back
    overrides = [item for item in args.checkpoint or [] if re.match(r"\w+\.\w+=", str(item))]
    args.overrides = [str(item) for item in overrides] + args.overrides
    checkpoints = [item for item in args.checkpoint or [] if item not in overrides] or [None]
    try:
        if len(checkpoints) > 1:
            if args.input or args.export:
                raise UserError(
                    "--checkpoint: several checkpoints are scored each on its own held-out images; --input and "
                    "--export take one"
                )
            summarize_runs(checkpoints, args)
            return 0
        trained = load_trained(checkpoints[0], args.config, args.overrides, args.tta)
        print(trained.describe())
        if args.export:
            export(trained, args.export)
            return 0
        if args.input:
            predict_files(
                trained.predictor,
                input_images(args.input),
                args.output or Path("predictions"),
                args.probabilities,
                args.overlay,
                args.instances,
                trained.config.data.max_image_pixels,
            )
            return 0
        output = score_checkpoint(trained, args, args.output)[1]
    except (UserError, OSError) as error:  # OSError: a full disk, a file that cannot be written
        return report_error(error)
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


def export(trained: Trained, path: Path) -> None:
    """``--export``: a bioimage.io package (``.zip``, its test tensors from the first validation image),
    TorchScript (``.pt``) or ONNX (``.onnx``), each checked against PyTorch."""
    model, config, plan, progress = trained.model, trained.config, trained.plan, trained.progress
    channels, side = config.unet.image_channels, plan.tile_shape  # a side (2D) or (depth, height, width)
    suffix = path.suffix.lower()
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise UserError(f"--export {path}: cannot write to {path.parent} (not a writable folder)")
    if suffix == ".zip":
        image = trained.datasets(note).val[0][0].numpy()
        validation = {
            "data": f"{config.data.dataset_name} ({config.data.data})",
            "checkpoint": f"{trained.path}, epoch {progress.epoch} of run {progress.run_name}",
            f"best validation {config.run.best_metric}": f"{progress.best_value}, epoch {progress.best_epoch}",
        }
        summary = export_package(model, path, config.unet, config.data, image, validation, spacing=plan.spacing)
        differences = ", ".join(f"{name} {value:.2e}" for name, value in summary["differences"].items())
        print(f"wrote {path}: {', '.join(summary['files'])}; largest differences from PyTorch: {differences}")
    elif suffix == ".pt":
        difference = export_torchscript(model, path, channels, side)
        print(f"wrote {path} (TorchScript); it and PyTorch differ by at most {difference:.2e}")
    elif suffix == ".onnx":
        export_onnx(model, path, channels, sample_size=side)
        difference = check_onnx(model, path, torch.randn(1, channels, *sample_shape(model, side)))
        print(f"wrote {path}; onnxruntime and PyTorch differ by at most {difference:.2e}")
    else:
        raise UserError(f"--export {path}: write MODEL.zip (bioimage.io package), MODEL.pt (TorchScript) or MODEL.onnx")


def score_checkpoint(trained: Trained, args: argparse.Namespace, output: Path | None) -> tuple[dict, Path]:
    """``diagnostics.diagnose`` of one checkpoint on its held-out images (``--split``: ``test``, the
    images of ``train.test_images`` or ``train.folds``; ``val``, the validation images; default: test
    when there are test images); returns its overall scores and the folder of its masks and figures
    (``output``, else ``<log_path>/<run>/diagnostics``)."""
    config = trained.config
    output = output or Path(config.run.log_path) / trained.progress.run_name / "diagnostics"
    data = trained.datasets(note)
    split = args.split or ("test" if data.test is not None else "val")
    dataset = data.test if split == "test" else data.val
    if dataset is None:
        raise UserError(
            "--split test: the config sets no train.test_images; use --split val, or train with train.test_images=[...]"
        )
    layers = args.layers.split(",") if args.layers else None
    try:
        scores = diagnose(trained.predictor, dataset, split, config.train.loss, output, layers, args.instances)
    except torch.OutOfMemoryError:  # the saliency and gradient norms take a whole image in one pass
        raise UserError(
            f"out of memory computing the diagnostics' gradients of whole images on "
            f"{memory_description(trained.device)}: run test.py with train.device=cpu, or write masks only with --input"
        ) from None
    return scores, output


def summarize_runs(checkpoints: list[Path], args: argparse.Namespace) -> None:
    """Score each checkpoint as ``score_checkpoint`` does (into ``--output/<run>`` where given), then print
    one row per run and the mean and standard deviation of every score: the cross-validation result of
    ``train.fold=all``."""
    names, results, num_classes = [], [], set()
    for checkpoint in checkpoints:
        trained = load_trained(checkpoint, args.config, args.overrides, args.tta)
        print(f"\n{trained.describe()}")
        names.append(trained.progress.run_name)
        results.append(score_checkpoint(trained, args, args.output / names[-1] if args.output else None)[0])
        num_classes.add(trained.config.unet.num_classes)
    if len(num_classes) > 1:
        raise UserError(
            f"--checkpoint: the checkpoints have {' and '.join(map(str, sorted(num_classes)))} classes; a summary "
            "compares runs of one task"
        )
    print("\n" + score_summary(names, results, num_classes.pop()))


if __name__ == "__main__":
    sys.exit(main())
