"""ONNX export of a trained U-Net, checked against PyTorch with onnxruntime.

The exported graph takes any valid input size (dynamic batch, height and width, and depth for a 3D network);
``onnx`` and ``onnxruntime`` are optional packages, asked for with a one-line error when missing.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import Tensor, nn

from segmentation.config import UserError
from segmentation.inference.infer import evaluating

SPATIAL_NAMES = ("depth", "height", "width")  # the exported graphs' names of the (D,) H and W axes


def _require(package: str, purpose: str) -> ModuleType:
    """Import ``package`` or raise a one-line UserError that says how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise UserError(f"{purpose} needs the {package} package: pip install onnx onnxruntime") from None


def sample_shape(model: nn.Module, sample_size: int | Sequence[int]) -> tuple[int, ...]:
    """The spatial shape of the input an export traces: ``sample_size`` along every axis of ``model`` (a square
    image, a cube), or one size per axis ((D, H, W) for a 3D network); a ValueError naming the nearest valid
    sizes where one does not fit its axis (checked here rather than left to ``UNet.forward``: while tracing,
    sizes are tensors that its size arithmetic changes in place, so its message would name a wrong size)."""
    dims = model.dims
    shape = (sample_size,) * dims if isinstance(sample_size, int) else tuple(int(side) for side in sample_size)
    if len(shape) != dims:
        raise ValueError(f"a {dims}D network takes {dims} sample sizes, got {shape}")
    for axis, side in enumerate(shape):
        try:
            model.output_size(side, axis)
        except ValueError as error:
            if dims == 2:
                raise
            raise ValueError(f"{SPATIAL_NAMES[axis]}: {error}") from None
    return shape


def export_onnx(
    model: nn.Module,
    path: str | Path,
    image_channels: int,
    sample_size: int | Sequence[int],
    opset: int | None = None,
) -> None:
    """Export ``model`` to ONNX with a dynamic batch size, height and width (and depth for a 3D network).

    Parameters
    ----------
    model : model.UNet
        Exported in eval mode (BatchNorm's running statistics and no dropout are baked in); its
        train/eval flags are restored afterwards.
    path : str or Path
        Output ``.onnx`` file.
    image_channels : int
        Channels of the input (``model.image_channels``).
    sample_size : int or sequence of int
        Height and width in px of the square zero input the export traces (a cube for a 3D network), or its
        size along each spatial axis ((D, H, W) for a 3D network, whose axes have valid sizes of their own);
        any valid input size (see ``model.valid_input_sizes``) gives the same file.
    opset : int, optional
        ONNX opset version; None takes the exporter's default (20 with torch 2.13).

    Raises
    ------
    UserError
        If the ``onnx`` package is missing.
    ValueError
        If ``sample_size`` is not a valid input size along every axis; the message names the nearest valid ones.

    Notes
    -----
    Uses the TorchScript-based exporter (``dynamo=False``), which needs no onnxscript. It traces the
    network: the shape arithmetic of the crops and upsamplings is recorded as graph operations, so the
    file works for every valid input size, while the Python size checks of ``UNet.forward`` become
    constants. The ONNX model therefore does not check sizes: for an invalid height or width its
    poolings floor odd sizes and its crops trim the skips to fit, so it silently returns a smaller,
    misaligned output where the PyTorch model raises. Feed it valid sizes only. Input ``image``
    (batch, channels, height, width), output ``logits`` (batch, classes, out_height, out_width), with
    ``depth`` and ``out_depth`` before the height for a 3D network; both in the model's dtype. The file is
    validated with ``onnx.checker``.
    """
    onnx = _require("onnx", "ONNX export")
    shape = sample_shape(model, sample_size)
    parameter = next(model.parameters())
    sample = torch.zeros(1, image_channels, *shape, dtype=parameter.dtype, device=parameter.device)
    names = SPATIAL_NAMES[-len(shape) :]
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
                "image": {0: "batch", **{axis: name for axis, name in enumerate(names, start=2)}},
                "logits": {0: "batch", **{axis: f"out_{name}" for axis, name in enumerate(names, start=2)}},
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
    sample : Tensor, shape (B, C, H, W) or (B, C, D, H, W), float
        A valid input, of any valid size (not only the exported one). Cast to the model's dtype.

    Returns
    -------
    float
        ``max |onnx logits - torch logits|`` in logit units, over the whole (B, K, h, w) or (B, K, d, h, w)
        output.

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


def export_torchscript(
    model: nn.Module, path: str | Path, image_channels: int, sample_size: int | Sequence[int]
) -> float:
    """Write ``model`` as TorchScript (traced in eval mode, as QuPath and deepImageJ load it) and return the
    largest absolute difference of its logits from PyTorch's on a random input of the next valid size
    up along each axis (``sample_size`` as ``export_onnx`` takes it): the trace records the crops' and
    upsamplings' shape arithmetic, so it runs at every valid size (the size checks of ``UNet.forward`` become
    constants, as in ``export_onnx``: feed it valid sizes)."""
    shape = sample_shape(model, sample_size)  # a clear error for an invalid size, before tracing
    parameter = next(model.parameters())
    sample = torch.zeros(1, image_channels, *shape, dtype=parameter.dtype, device=parameter.device)
    with evaluating(model), warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # torch 2.13 calls TorchScript deprecated; QuPath and deepImageJ load TorchScript, not torch.export
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        traced = torch.jit.trace(model, (sample,), check_trace=False)
        traced.save(str(path))
        # another size than the traced one along each axis: one step of its poolings further
        other = [model.valid_input_size(side + math.prod(model.axis(axis)[1]), axis) for axis, side in enumerate(shape)]
        check = torch.randn(1, image_channels, *other, generator=torch.Generator().manual_seed(0))
        check = check.to(parameter.device, parameter.dtype)
        loaded = torch.jit.load(str(path), map_location=parameter.device)
        return float((loaded(check) - model(check)).abs().max())
