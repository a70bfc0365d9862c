"""One way from a checkpoint back to a model and its predictor: the stored plan and weights, the settings on top.

As nnU-Net's ``nnUNetPredictor.initialize_from_trained_model_folder``, ``load_trained`` is the one
constructor that test.py, training's final calibration, export and the benchmarks use: it reads the
checkpoint as data, resolves the config stored in it (or the one given) with ``section.key=value``
overrides, builds the network the plan describes, loads the weights, and makes the predictor of the plan
with the ``predict`` settings in force on top (``Plan.for_prediction``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dataset import DataSets, build_datasets, prepare_data
from model import UNet, build_model, valid_input_sizes
from segmentation.checkpoints import (
    Progress,
    check_architecture,
    check_weights,
    find_best_checkpoint,
    load_weights,
    read_checkpoint,
)
from segmentation.config import DEFAULT_CONFIG, Config, load_config, merge_overrides, resolve
from segmentation.console import note
from segmentation.device import require_memory, resolve_device
from segmentation.geometry import axis_geometry
from segmentation.inference.infer import Predictor
from segmentation.memory import forward_maps, prediction_activation_bytes, shown_tile, unet_parameter_count
from segmentation.plan import Plan, stored_plan

# where a run writes: the config in force decides, never the config stored in a checkpoint
OUTPUT_KEYS = ("train.save_path", "train.log_path", "train.cache_dir")


@dataclass
class Trained:
    """A trained model as its checkpoint holds it: ``model`` (in eval mode on ``device``), its
    ``predictor``, the ``config`` in force (stored or given, with the overrides), the run's ``plan`` as
    stored (the predictor's has the ``predict`` settings on top), its ``progress``, the checkpoint's
    ``path`` and its contents (``state``)."""

    model: UNet
    predictor: Predictor
    config: Config
    plan: Plan
    progress: Progress
    path: Path
    device: torch.device
    state: dict

    def datasets(self, note: Callable[[str], None] = print) -> DataSets:
        """The images of the config in force, split, labelled, weighted and cut as the run's plan says (a
        checkpoint from before plans has its balanced class weights decided again from its training images)."""
        config = self.config
        unet, data, seed = config.unet, config.data, config.train.seed
        prepared = prepare_data(data, unet.image_channels, unet.num_classes, seed, note, dims=unet.dims)
        plan = stored_plan(self.state, config, str(self.path), prepared.train)
        return build_datasets(prepared, plan, data.samples_per_image, seed, note)

    def describe(self) -> str:
        """The line that says which checkpoint runs where: ``PATH (epoch N) on DEVICE``."""
        return f"{self.path} (epoch {self.progress.epoch}) on {self.device}"


def load_trained(
    checkpoint: Path | None = None,
    config_path: Path | None = None,
    overrides: Sequence[str] = (),
    tta: bool = False,
    device: torch.device | None = None,
    calibrating: bool = False,
    current: Config | None = None,
) -> Trained:
    """The model and predictor of ``checkpoint`` (default: the newest ``best.pt`` under
    ``train.save_path``), with the config stored in it or the one at ``config_path`` and
    ``section.key=value`` overrides on top (the architecture must match the checkpoint's), test-time
    augmentation where ``tta`` or ``predict.tta`` asks for it, on ``device`` (default: ``train.device``).
    Where outputs go (``OUTPUT_KEYS``) is the config in force's: ``config_path``, else ``current`` (training's
    own config), else the shipped config.yaml, with the overrides; never the checkpoint's. A checkpoint
    whose weights are not finite, do not fit its network, or whose network and prediction tiles would not
    fit the device's memory is a UserError. A note says when ``predict.threshold: auto`` finds no
    calibrated threshold, unless ``calibrating``."""
    if checkpoint is None:
        save_path = Path(load_config(config_path or DEFAULT_CONFIG, overrides).run.save_path)
        checkpoint = find_best_checkpoint(save_path)
    state = read_checkpoint(checkpoint)
    notices: list[str] = []
    if config_path:
        config = load_config(config_path, overrides, notices)
    else:
        stored = resolve(merge_overrides(state["config"], overrides), notices)
        config = with_folders_of(stored, current or config_in_force(overrides))
    for message in notices:
        note(message)
    check_architecture(state, config.unet, checkpoint)
    check_weights(state, checkpoint)
    progress = Progress.from_dict(state["progress"], checkpoint)
    plan = stored_plan(state, config, str(checkpoint))
    device = device or resolve_device(config.train.device)
    check_prediction_memory(config, plan, device, checkpoint)
    model = build_model(config.unet, plan.boundary_class, plan.kernel_sizes, plan.pool_sizes).to(device)
    load_weights(model, state["model"], checkpoint)
    model.eval()
    uncalibrated = config.predict.threshold == "auto" and plan.threshold_source == "uncalibrated"
    if uncalibrated and plan.num_classes == 2 and not calibrating:
        note(
            f"predict.threshold=auto but {checkpoint} holds no calibrated threshold "
            "(it is stored at the end of training): using 0.5"
        )
    predictor = Predictor.from_plan(model, plan, config.predict, config.augment, config.data.image_scale, tta)
    return Trained(model, predictor, config, plan, progress, checkpoint, device, state)


def config_in_force(overrides: Sequence[str]) -> Config:
    """The config that decides where outputs go when a checkpoint's own config is used: the shipped
    config.yaml (the defaults where it is gone) with the overrides of ``OUTPUT_KEYS`` on top (the others
    belong to the checkpoint's network and may not fit the shipped one)."""
    own = [item for item in overrides if item.partition("=")[0].strip() in OUTPUT_KEYS]
    return load_config(DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None, own)


def with_folders_of(config: Config, current: Config) -> Config:
    """``config`` with ``current``'s ``train.save_path``, ``log_path`` and ``cache_dir``: a checkpoint's stored
    paths (edited, or another machine's) never say where this process writes."""
    run = dataclasses.replace(config.run, save_path=current.run.save_path, log_path=current.run.log_path)
    return dataclasses.replace(config, run=run, data=dataclasses.replace(config.data, cache_dir=current.data.cache_dir))


def check_prediction_memory(config: Config, plan: Plan, device: torch.device, checkpoint: Path) -> None:
    """A UserError (one line) before the network is built where it and a batch of prediction tiles
    (``predict.batch_size`` tiles of ``predict.tile_size``, rounded up to a valid size) would not fit the
    memory ``device`` has free: a checkpoint whose stored widths were edited, or tiles too large."""
    unet, batch = config.unet, config.predict.batch_size
    planned = plan.for_prediction(config.predict).predict_tile
    geometry = (plan.kernel_sizes, plan.pool_sizes)
    if plan.dims == 3:
        tile = tuple(
            valid_input_sizes(side, unet.depth, unet.padding, *axis_geometry(*geometry, axis))[1]
            for axis, side in enumerate(planned)
        )
    else:
        tile = valid_input_sizes(planned, unet.depth, unet.padding)[1]
    blocks = forward_maps(unet, plan.label_classes, tile, 4, *geometry)
    parts = {
        "parameters": 4 * unet_parameter_count(unet, plan.label_classes, *geometry),
        f"activations of {batch} tiles of {shown_tile(tile)} px": batch * prediction_activation_bytes(blocks),
    }
    advice = (
        f"lower predict.tile_size ({tile if plan.dims == 2 else shown_tile(tile)}) or predict.batch_size ({batch}), "
        f"or use a checkpoint of smaller unet.input_channels (this one has {list(unet.input_channels)})"
    )
    require_memory(f"{checkpoint}: predicting", parts, device, advice)
