"""ONNX export of a trained U-Net, checked against PyTorch with onnxruntime.

The exported graph takes any valid input size (dynamic batch, height and width); ``onnx`` and
``onnxruntime`` are optional packages, asked for with a one-line error when missing.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import Tensor, nn

from segmentation.config import UserError
from segmentation.inference.infer import evaluating


def _require(package: str, purpose: str) -> ModuleType:
    """Import ``package`` or raise a one-line UserError that says how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise UserError(f"{purpose} needs the {package} package: pip install onnx onnxruntime") from None


def export_onnx(
    model: nn.Module, path: str | Path, image_channels: int, sample_size: int, opset: int | None = None
) -> None:
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


def export_torchscript(model: nn.Module, path: str | Path, image_channels: int, sample_size: int) -> float:
    """Write ``model`` as TorchScript (traced in eval mode, as QuPath and deepImageJ load it) and return the
    largest absolute difference of its logits from PyTorch's on a random input of the next valid size
    up: the trace records the crops' and upsamplings' shape arithmetic, so it runs at every valid size
    (the size checks of ``UNet.forward`` become constants, as in ``export_onnx``: feed it valid sizes)."""
    model.output_size(sample_size)  # a clear error for an invalid size, before tracing
    parameter = next(model.parameters())
    sample = torch.zeros(1, image_channels, sample_size, sample_size, dtype=parameter.dtype, device=parameter.device)
    with evaluating(model), warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # torch 2.13 calls TorchScript deprecated; QuPath and deepImageJ load TorchScript, not torch.export
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        traced = torch.jit.trace(model, (sample,), check_trace=False)
        traced.save(str(path))
        other = model.valid_input_size(sample_size + 2**model.depth)  # another size than the traced one
        check = torch.randn(1, image_channels, other, other, generator=torch.Generator().manual_seed(0))
        check = check.to(parameter.device, parameter.dtype)
        loaded = torch.jit.load(str(path), map_location=parameter.device)
        return float((loaded(check) - model(check)).abs().max())
