"""Segment image files with a trained model: a mask per input (and optionally probabilities and overlays).

For two classes a mask is a 0/255 PNG (255 = class 1; for ISBI 2012 the challenge's label convention),
for more classes a PNG of class indices; a multi-page TIFF gives a multi-page TIFF of masks. Images
pass through the preprocessing of training (``preprocess.normalize_image``) and the tiled predictor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import skimage.io
import tifffile
import torch

from config import UserError
from console import note
from infer import predict_with_config, predicted_classes
from preprocess import normalize_image
from readers import IMAGE_SUFFIXES, image_files, read_image

OVERLAY_COLOURS = np.array([(0, 0, 0), (255, 60, 60), (60, 160, 255), (80, 220, 80), (255, 200, 40), (200, 80, 255)], dtype=np.float32)


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
