"""bioimage.io model packages: a trained U-Net for deepImageJ (Fiji), QuPath, ilastik and napari, as one zip file.

The package follows the bioimage.io model description 0.5 (``rdf.yaml``) and holds everything locally
(no address a tool would have to reach): TorchScript weights (what QuPath and deepImageJ run), the
PyTorch state dict with ``model.py`` as its architecture, ONNX weights where the ``onnx`` package is
installed and the export matches PyTorch, a test input and output from a validation image, a cover,
a README with a ``# Validation`` section, the paper as citation and the license. The input takes every
size the U-Net accepts (a minimum and a step along each axis); the output is the input's size less the
context the valid convolutions use (padding 0) or the same (padding 1). Preprocessing is the project's
normalisation (zero mean, unit variance over the image), postprocessing a softmax over the classes, so
that the output is each class's probability. A 3D network's package has the axes z, y and x, each with its
own minimum, step and context (its kernels and poolings per axis) and the voxel spacing as the axes' scale;
its test input is a window of a volume, its cover the middle section.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import hashlib
import math
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import skimage.io
import skimage.transform
import tifffile
import torch
import yaml

from model import UNet, valid_input_sizes
from segmentation.config import UserError
from segmentation.data.preprocess import mirrored_indices, network_margin, take_window
from segmentation.inference.export import export_onnx, export_torchscript
from segmentation.inference.infer import evaluating
from segmentation.settings import DataSettings, UNetSettings, plain

FORMAT_VERSION = "0.5.4"  # bioimage.io model description read by bioimageio.spec 0.5 and the tools built on it
TOLERANCE = 1e-3  # what bioimageio test allows between each weight format's output and the test output
TEST_SIDE = {2: 256, 3: 96}  # the test input's largest side along an axis (an image's, a volume's) where it fits
PAPER = {
    "text": "Ronneberger, Fischer & Brox. U-Net: Convolutional Networks for Biomedical Image Segmentation. "
    "MICCAI 2015.",
    "doi": "10.1007/978-3-319-24574-4_28",
}
CLASS_NAMES = {
    "isbi2012": ["membrane", "cell"],
    "synthetic": ["membrane", "cell", "organelle"],
    "pennfudan": ["background", "person"],
}


def class_names(dataset_name: str, num_classes: int) -> list[str]:
    """The output channels' names: the classes of the known data sets, else ``background``, ``class_1``, ..."""
    known = CLASS_NAMES.get(dataset_name, [])
    return (
        known[:num_classes]
        if len(known) >= num_classes
        else ["background", *(f"class_{c}" for c in range(1, num_classes))]
    )


@dataclass(frozen=True)
class SpaceAxis:
    """One spatial axis of the package's tensors: its ``id`` (``z``, ``y`` or ``x``), the smallest valid input
    size along it and the ``step`` between valid sizes (the product of its pooling factors), in pixels, the
    ``offset`` of the output's size from the input's (minus the context the network loses on both sides;
    0 with padding 1), and the voxel spacing along it (``scale``; None: not stated, as for images)."""

    id: str
    smallest: int
    step: int
    offset: int
    scale: float | None = None


@dataclass(frozen=True)
class Volume:
    """What a 3D network's package says of its geometry: the voxel ``spacing`` (z, y, x) of its training volumes
    (None: not known), its ``kernel_sizes`` and ``pool_sizes`` per level and axis (z, y, x), and its ``axes``."""

    spacing: tuple[float, ...] | None
    kernel_sizes: tuple[tuple[int, ...], ...]
    pool_sizes: tuple[tuple[int, ...], ...]
    axes: tuple[SpaceAxis, ...]


def space_axes(model: UNet, spacing: Sequence[float] | None = None) -> list[SpaceAxis]:
    """The spatial axes of ``model``'s inputs and outputs: y and x for images, z, y and x for volumes (with the
    voxel ``spacing`` (z, y, x) of its training volumes as their scale, where known), each from the network's
    kernels and poolings along it."""
    ids = ("y", "x") if model.dims == 2 else ("z", "y", "x")
    axes = []
    for axis, name in enumerate(ids):
        kernels, pools = model.axis(axis)
        smallest = valid_input_sizes(1, model.depth, model.padding, kernels, pools)[1]
        offset = -2 * network_margin(model.depth, model.padding, kernels, pools)
        scale = None if model.dims == 2 or spacing is None else exact_scale(spacing[axis])
        axes.append(SpaceAxis(name, smallest, math.prod(pools), offset, scale))
    return axes


def exact_scale(spacing: float) -> float:
    """``spacing`` as an axis's scale that bioimage.io tools can divide out again. They size an output axis as
    ``int(size * scale / scale + offset)`` (bioimageio.spec's ``SizeReference.get_size``), which is one short for
    some sizes at most decimal spacings (0.1, 0.3, 0.04, ...); where that happens for a size below 2**16, the
    nearest float32 instead (24 significant bits: every product with a size below 2**29 is exact)."""
    spacing = float(spacing)
    sizes = np.arange(1, 2**16, dtype=np.float64)
    return spacing if np.array_equal(sizes * spacing / spacing, sizes) else float(np.float32(spacing))


def test_input(
    image: np.ndarray,
    depth: int,
    padding: int,
    largest: int = 256,
    axes: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None,
) -> np.ndarray:
    """(1, C, S, S) float32: a square window of a validation image (C, H, W) at the valid input size S
    nearest below ``min(H, W, largest)`` (above where no valid size is that small: mirrored beyond the
    image, as the predictor does). For a volume (C, D, H, W), ``axes`` gives the network's ``(kernels, pools)``
    along z, y and x (``UNet.axis``): (1, C, S_z, S, S), S_z the valid size along z nearest below
    ``min(D, largest)`` and S as for an image, each valid along its axis."""
    axes = axes or [(None, None)] * 2
    in_plane = min(*image.shape[-2:], largest)
    targets = [min(length, largest) for length in image.shape[1:-2]] + [in_plane, in_plane]
    sides = []
    for target, (kernels, pools) in zip(targets, axes):
        below, above = valid_input_sizes(target, depth, padding, kernels, pools)
        sides.append(below or above)
    indices = [mirrored_indices(0, side, length) for side, length in zip(sides, image.shape[1:])]
    return take_window(np.asarray(image, dtype=np.float32), *indices)[None].astype(np.float32)


def test_output(model: UNet, image: np.ndarray) -> np.ndarray:
    """(1, K, h, w) (or (1, K, d, h, w)) float32 class probabilities of ``model`` on ``image`` after the package's
    preprocessing (zero mean, unit variance over the image or volume, as bioimage.io computes it) and softmax."""
    normalised = (image - image.mean()) / (image.std() + 1e-6)
    parameter = next(model.parameters())
    with evaluating(model), torch.no_grad():
        logits = model(torch.from_numpy(normalised.astype(np.float32)).to(parameter.device, parameter.dtype))
    return logits.float().softmax(1).cpu().numpy()


def cover(image: np.ndarray, probabilities: np.ndarray, path: Path) -> None:
    """A 2:1 PNG, each half 256 x 256 px: the part of the test input that the output covers (all of it for
    padding 1, less the context margin for padding 0), and its most probable class; of a volume
    (1, C, D, H, W), the output's middle section and the input's section under it."""
    if image.ndim == 5:
        section = probabilities.shape[2] // 2
        image = image[:, :, section + (image.shape[2] - probabilities.shape[2]) // 2]
        probabilities = probabilities[:, :, section]
    shown = image[0, 0] if image.shape[1] == 1 else image[0, :3].mean(axis=0)
    rows, cols = ((side - out) // 2 for side, out in zip(shown.shape, probabilities.shape[-2:]))
    shown = shown[rows : shown.shape[0] - rows, cols : shown.shape[1] - cols]
    shown = (shown - shown.min()) / max(float(shown.max() - shown.min()), 1e-12)
    classes = probabilities[0].argmax(0) / max(probabilities.shape[1] - 1, 1)
    panels = [skimage.transform.resize(panel, (256, 256), order=0) for panel in (shown, classes)]
    skimage.io.imsave(path, (255 * np.concatenate(panels, axis=1)).astype(np.uint8), check_contrast=False)


def readme(
    unet: UNetSettings, data: DataSettings, names: list[str], validation: dict, volume: Volume | None = None
) -> str:
    """The package's documentation: what the model is (for a 3D network, its voxel spacing and its kernels,
    poolings and valid sizes along each axis), how to run it, and a ``# Validation`` section."""
    scores = "\n".join(f"- {key}: {value}" for key, value in validation.items())
    kind, network, unit = ("images", "U-Net", "image") if volume is None else ("volumes", "3D U-Net", "volume")
    convolutions = "valid" if unet.padding == 0 else "same-size"
    return f"""# {network} for {data.dataset_name}

A {network} (Ronneberger et al. 2015) of widths {list(unet.input_channels)}, {convolutions}
convolutions, {unet.norm} normalisation, trained for semantic segmentation into {len(names)} classes
({", ".join(names)}) of {unet.image_channels}-channel {kind} scaled by {data.image_scale}.{sparse_labels(data)}
{volume_geometry(volume)}
Input: one {unit} of {unet.image_channels} channel(s), normalised to zero mean and unit variance over the {unit}
(the package's preprocessing does it). Output: each class's probability (softmax over the channels).

# Validation

{scores}

The test output was computed from the test input (a window of a validation {unit}) by the PyTorch model;
each weight format reproduces it within a tolerance of {TOLERANCE}. Open the package in deepImageJ (Fiji:
DeepImageJ Install Model, from a local zip), QuPath (the Pixel classification / deep learning extension:
drag the zip or its TorchScript weights) or napari (the bioimageio or napari-bioimageio plugin).
"""


def volume_geometry(volume: Volume | None) -> str:
    """The README's paragraph on a 3D network's axes (empty for images): its voxel spacing, its kernels and
    poolings per level and axis, and the valid input sizes and context along each axis."""
    if volume is None:
        return ""

    def shown(sizes: tuple[tuple[int, ...], ...]) -> str:
        return ", ".join("x".join(map(str, level)) for level in sizes)

    spacing = "not known (1 per axis)" if volume.spacing is None else f"{tuple(volume.spacing)}"
    sizes = "\n".join(
        f"- {axis.id}: {axis.smallest} + n x {axis.step} voxels, the output {-axis.offset} shorter"
        for axis in volume.axes
    )
    return f"""
A 3D network: input and output have the axes z, y and x (sections, rows, columns). Voxel spacing (z, y, x):
{spacing}, in the training volumes' unit (the axes' scale in rdf.yaml). Kernels per level
(z x y x, the bottleneck last): {shown(volume.kernel_sizes)}; poolings per level: {shown(volume.pool_sizes)}
(an axis whose spacing is more than twice the finest is convolved with a kernel of 1 and not pooled until the
others catch up, nnU-Net's rule). Valid input sizes along each axis (n = 0, 1, 2, ...):

{sizes}
"""


def sparse_labels(data: DataSettings) -> str:
    """The sentence that says the model learnt from masks annotated in part, and how they marked the rest
    (``train.ignore_value`` or ``ignore_color``; the run's plan records it too); nothing for dense masks."""
    if data.ignore_value is None and data.ignore_color is None:
        return ""
    marked = (
        f"the value {data.ignore_value:g}" if data.ignore_value is not None else f"the colour {list(data.ignore_color)}"
    )
    return (
        f" It learnt from masks annotated in part: {marked} marked the pixels nobody annotated, which counted "
        "nowhere in training or validation."
    )


def description(
    unet: UNetSettings,
    data: DataSettings,
    names: list[str],
    files: dict[str, Path],
    onnx_opset: int | None,
    author: str,
    axes: Sequence[SpaceAxis],
    volume: Volume | None = None,
) -> dict:
    """The ``rdf.yaml`` contents (bioimage.io model description 0.5) for the package's ``files``, the network's
    spatial ``axes`` (``space_axes``) and, for a 3D network, its ``volume`` geometry."""
    channels = (
        ["gray"]
        if unet.image_channels == 1
        else ["red", "green", "blue", *(f"channel_{c}" for c in range(3, unet.image_channels))][: unet.image_channels]
    )
    # the spacing as each axis's scale, the same on the output's, whose size bioimage.io tools then compute as
    # the input's size times the input axis's scale over the output axis's, plus the offset
    scales = [{} if axis.scale is None else {"scale": axis.scale} for axis in axes]
    space = [
        {"type": "space", "id": axis.id, "size": {"min": axis.smallest, "step": axis.step}, **scale}
        for axis, scale in zip(axes, scales)
    ]
    output_space = [
        {"type": "space", "id": axis.id, "size": {"tensor_id": "image", "axis_id": axis.id, "offset": axis.offset}}
        | scale
        for axis, scale in zip(axes, scales)
    ]
    kind, dims, network = ("image", "2d", "U-Net") if volume is None else ("volume", "3d", "3D U-Net")
    normalised = ["channel", *(axis.id for axis in axes)]  # over the whole image or volume, as training normalises

    def file(name: str) -> dict:
        return packed_file(files[name])

    return {
        "type": "model",
        "format_version": FORMAT_VERSION,
        "name": f"{network} {data.dataset_name} {len(names)} classes",
        "description": (
            f"{network} (Ronneberger et al. 2015) segmenting {data.dataset_name} {kind}s: {', '.join(names)}."
            + sparse_labels(data)
        ),
        "authors": [{"name": author}],
        "cite": [PAPER],
        "license": "MIT",
        "tags": ["unet", "segmentation", "pytorch", dims, data.dataset_name],
        "documentation": files["readme"].name,
        "covers": [files["cover"].name],
        "timestamp": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "inputs": [
            {
                "id": "image",
                "description": f"{unet.image_channels}-channel {kind}",
                "axes": [{"type": "batch"}, {"type": "channel", "channel_names": channels}, *space],
                "test_tensor": file("test_input"),
                "sample_tensor": file("sample_input"),
                "data": {"type": "float32"},
                "preprocessing": [{"id": "zero_mean_unit_variance", "kwargs": {"axes": normalised, "eps": 1e-6}}],
            }
        ],
        "outputs": [
            {
                "id": "probabilities",
                "description": "each class's probability",
                "axes": [{"type": "batch"}, {"type": "channel", "channel_names": names}, *output_space],
                "test_tensor": file("test_output"),
                "sample_tensor": file("sample_output"),
                "data": {"type": "float32", "range": [0.0, 1.0]},
                "postprocessing": [{"id": "softmax", "kwargs": {"axis": "channel"}}],
            }
        ],
        "weights": weight_formats(unet, files, onnx_opset, volume),
        "config": {
            "bioimageio": {
                "reproducibility_tolerance": [{"relative_tolerance": TOLERANCE, "absolute_tolerance": TOLERANCE}]
            }
        },
    }


def packed_file(path: Path) -> dict:
    """A file of the package as its description names it: its name and SHA-256."""
    return {"source": path.name, "sha256": sha256(path)}


def weight_formats(
    unet: UNetSettings, files: dict[str, Path], onnx_opset: int | None, volume: Volume | None = None
) -> dict:
    """The description's ``weights``: the state dict with its architecture (with a 3D network's kernel and pooling
    sizes), TorchScript and (where the onnx package exported it, at ``onnx_opset``) ONNX."""
    torch_version = torch.__version__.split("+")[0]
    kwargs = dataclasses.asdict(unet)
    if volume is not None:
        kwargs |= {"kernel_sizes": volume.kernel_sizes, "pool_sizes": volume.pool_sizes}
    architecture = {**packed_file(files["architecture"]), "callable": "UNet", "kwargs": plain(kwargs)}
    weights = {
        "pytorch_state_dict": {
            **packed_file(files["state_dict"]),
            "architecture": architecture,
            "pytorch_version": torch_version,
        },
        "torchscript": {
            **packed_file(files["torchscript"]),
            "parent": "pytorch_state_dict",
            "pytorch_version": torch_version,
        },
    }
    if onnx_opset is not None:
        weights["onnx"] = {**packed_file(files["onnx"]), "parent": "pytorch_state_dict", "opset_version": onnx_opset}
    return weights


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_package(
    model: UNet,
    path: Path,
    unet: UNetSettings,
    data: DataSettings,
    image: np.ndarray,
    validation: dict,
    author: str | None = None,
    spacing: Sequence[float] | None = None,
) -> dict:
    """Write the bioimage.io package of ``model`` (trained with ``unet`` and the data settings ``data``) to
    ``path`` (a ``.zip``, written whole or not at all), its test tensors from ``image`` (C, H, W), a validation image,
    and ``validation`` (what its README's ``# Validation`` says). For a 3D network ``image`` is a volume
    (C, D, H, W) and ``spacing`` its voxel spacing (z, y, x) (the run's plan's; None: not stated). Returns the
    files packed and the largest differences of the TorchScript and ONNX outputs from PyTorch's."""
    unet = dataclasses.replace(unet, boundary_class=model.boundary_class)  # auto, as the checkpoint decided it
    names = class_names(data.dataset_name, unet.num_classes) + ["border"] * model.boundary_class
    axes = space_axes(model, spacing)
    volume = None
    if model.dims == 3:
        spacing = None if spacing is None else tuple(float(size) for size in spacing)
        volume = Volume(spacing, model.kernel_sizes, model.pool_sizes, tuple(axes))
    if image.ndim != model.dims + 1:
        shape = "(C, H, W)" if model.dims == 2 else "(C, D, H, W)"
        raise ValueError(f"a {model.dims}D network's package takes a {shape} image, got shape {image.shape}")
    folder = Path(tempfile.mkdtemp(prefix="unet-package-"))
    try:
        files = {
            "torchscript": folder / "weights_torchscript.pt",
            "state_dict": folder / "weights_state_dict.pt",
            "architecture": folder / "model.py",
            "onnx": folder / "weights.onnx",
            "test_input": folder / "test_input.npy",
            "test_output": folder / "test_output.npy",
            "sample_input": folder / "sample_input.tif",
            "sample_output": folder / "sample_output.tif",
            "cover": folder / "cover.png",
            "readme": folder / "README.md",
        }
        geometry = [model.axis(axis) for axis in range(model.dims)]
        sample = test_input(image, unet.depth, unet.padding, TEST_SIDE[model.dims], geometry)
        expected = test_output(model, sample)
        np.save(files["test_input"], sample)
        np.save(files["test_output"], expected)
        tifffile.imwrite(files["sample_input"], sample[0], photometric="minisblack")  # for a person to look at
        tifffile.imwrite(files["sample_output"], expected[0], photometric="minisblack")
        cover(sample, expected, files["cover"])
        torch.save({name: tensor.cpu() for name, tensor in model.state_dict().items()}, files["state_dict"])
        shutil.copyfile(Path(__file__).resolve().parents[2] / "model.py", files["architecture"])
        differences = {
            "torchscript": export_torchscript(model, files["torchscript"], unet.image_channels, sample.shape[2:])
        }
        onnx_opset = onnx_weights(model, files["onnx"], unet.image_channels, sample, differences)
        if onnx_opset is None:
            del files["onnx"]
        files["readme"].write_text(readme(unet, data, names, validation, volume))
        rdf = description(unet, data, names, files, onnx_opset, author or getpass.getuser(), axes, volume)
        (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
        write_zip(path, [folder / "rdf.yaml", *files.values()])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"files": ["rdf.yaml", *(file.name for file in files.values())], "differences": differences}


def onnx_weights(model: UNet, path: Path, channels: int, sample: np.ndarray, differences: dict) -> int | None:
    """ONNX weights where the ``onnx`` and ``onnxruntime`` packages are installed and the export's logits
    match PyTorch's within the tolerance on the test input ``sample`` and on another valid size (one pooling step
    larger along each axis); returns the opset, or None (the package then goes without)."""
    from segmentation.inference.export import check_onnx

    opset = 17
    try:
        export_onnx(model, path, channels, sample.shape[2:], opset)
        other = [
            model.valid_input_size(side + math.prod(model.axis(axis)[1]), axis)
            for axis, side in enumerate(sample.shape[2:])
        ]
        check = torch.randn(1, channels, *other, generator=torch.Generator().manual_seed(0))
        differences["onnx"] = max(check_onnx(model, path, torch.from_numpy(sample)), check_onnx(model, path, check))
    except UserError:  # onnx or onnxruntime missing
        return None
    return opset if differences["onnx"] <= TOLERANCE else None


def write_zip(path: Path, files: list[Path]) -> None:
    """A zip of ``files`` (flat), written under a temporary name and renamed: whole or not at all."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for file in files:
                archive.write(file, file.name)
        os.replace(partial, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise UserError(f"--export {path}: cannot write the package ({error.strerror or error})") from None
