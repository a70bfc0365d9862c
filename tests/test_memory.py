"""Running out of memory, simulated on the CPU by a convolution that raises torch.OutOfMemoryError:
one line with the numbers and what to change, checkpoints intact, and prediction retrying with
smaller batches; and a NaN loss under fp16 pointing at bf16."""

import numpy as np
import pytest
import skimage.io
import torch
import torch.nn.functional as F

import training
from model import build_model
from segmentation.config import UserError, load_config
from segmentation.engine import step
from segmentation.inference import predict
from segmentation.inference.infer import Predictor
from tests.test_training import tiny_config

real_conv2d = F.conv2d


def run_out_of_memory(monkeypatch, above_batch: int = 0) -> list:
    """Make every convolution of a batch larger than ``above_batch`` raise as CUDA does when full;
    returns the batch sizes the convolutions were called with."""
    sizes = []

    def conv2d(input, *args, **kwargs):
        sizes.append(input.shape[0])
        if input.shape[0] > above_batch:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_conv2d(input, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", conv2d)
    return sizes


def test_out_of_memory_in_training_is_one_line_and_keeps_the_checkpoints(tmp_path, monkeypatch, capsys):
    first = training.train(tiny_config(tmp_path, "train.max_epochs=1", "train.run_name=oom"))
    saved = {name: (first["run_weights"] / name).read_bytes() for name in ("last.pt", "best.pt")}
    run_out_of_memory(monkeypatch)
    with pytest.raises(UserError) as caught:
        training.train(tiny_config(tmp_path, "train.max_epochs=2", "train.resume=auto"))
    message = str(caught.value)
    assert "\n" not in message and message.startswith("out of memory while training on cpu (")
    assert (
        "GiB of RAM) at train.batch_size=2, train.tile_size=60, train.precision=fp32: lower train.batch_size or "
        "train.tile_size, or set train.activation_checkpointing=true" in message
    )
    assert message.endswith("the checkpoints saved so far are intact (continue with train.resume=auto)")
    assert {name: (first["run_weights"] / name).read_bytes() for name in saved} == saved
    capsys.readouterr()
    overrides = [
        "unet.input_channels=[4, 8]",
        "train.synthetic_images=6",
        "train.synthetic_size=64",
        "train.tile_size=60",
        "train.batch_size=2",
        "train.device=cpu",
        f"train.save_path={tmp_path / 'weights'}",
        f"train.log_path={tmp_path / 'logs'}",
        "train.max_epochs=2",
    ]
    assert training.main(overrides) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1
        and errors[0].startswith("error: out of memory while training on cpu")
        and "Traceback" not in err
    )


def write_images(folder, count: int = 2) -> list:
    folder.mkdir()
    for index in range(count):
        skimage.io.imsave(
            folder / f"{index}.png",
            (np.random.default_rng(index).random((70, 70)) * 255).astype(np.uint8),
            check_contrast=False,
        )
    return sorted(folder.iterdir())


def test_prediction_halves_its_batch_until_it_fits(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    config = load_config(
        None, ["unet.input_channels=[4, 8]", "train.device=cpu", "predict.tile_size=60", "predict.batch_size=4"]
    )
    model = build_model(config.unet).eval()
    inputs = write_images(tmp_path / "images")
    reference = load_config(None, ["unet.input_channels=[4, 8]", "predict.tile_size=60", "predict.batch_size=1"])
    predict.predict_files(Predictor(model, reference.predict), inputs, tmp_path / "reference", probabilities=True)
    sizes = run_out_of_memory(monkeypatch, above_batch=1)
    predictor = Predictor(model, config.predict)
    predict.predict_files(predictor, inputs, tmp_path / "out", probabilities=True)
    notes = [line for line in capsys.readouterr().err.splitlines() if "out of memory" in line]
    assert notes == [
        "note: out of memory predicting on cpu: predict.batch_size is now 2 (tiles per forward pass), retrying",
        "note: out of memory predicting on cpu: predict.batch_size is now 1 (tiles per forward pass), retrying",
    ]
    # the predictor keeps its smaller batch for the second image; the settings stay as resolved
    assert predictor.batch_size == 1 and max(sizes[-10:]) == 1 and config.predict.batch_size == 4
    for name in ("0_probability.tif", "1_probability.tif"):
        assert np.array_equal(
            skimage.io.imread(tmp_path / "out" / name), skimage.io.imread(tmp_path / "reference" / name)
        )
    run_out_of_memory(monkeypatch, above_batch=0)
    with pytest.raises(
        UserError,
        match=(
            r"^out of memory while predicting on cpu \(.*\) with predict.batch_size=1, predict.tile_size=60: "
            r"lower predict.tile_size"
        ),
    ):
        predict.predict_files(predictor, inputs, tmp_path / "again")


def test_a_nan_loss_under_fp16_names_fp16_and_suggests_bf16(tmp_path, monkeypatch):
    original = step.segmentation_loss
    monkeypatch.setattr(step, "segmentation_loss", lambda *args: original(*args) * float("nan"))
    with pytest.raises(
        UserError,
        match=(
            r"training loss became nan .*: train.precision=fp16 overflows float16's range \(up to 65504\): use "
            r"train.precision=bf16, or lower train.lr"
        ),
    ):
        training.train(tiny_config(tmp_path, "train.precision=fp16", "train.max_epochs=1"))
    with pytest.raises(
        UserError, match=r"training loss became nan .*: lower train.lr \(now 0.001\) or set train.grad_clip"
    ):
        training.train(tiny_config(tmp_path / "fp32", "train.max_epochs=1"))
