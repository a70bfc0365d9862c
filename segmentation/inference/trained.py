"""One way from a checkpoint back to a model and its predictor: the stored plan and weights, the settings on top.

As nnU-Net's ``nnUNetPredictor.initialize_from_trained_model_folder``, ``load_trained`` is the one
constructor that test.py, training's final calibration, export and the benchmarks use: it reads the
checkpoint as data, resolves the config stored in it (or the one given) with ``section.key=value``
overrides, builds the network the plan describes, loads the weights, and makes the predictor of the plan
with the ``predict`` settings in force on top (``Plan.for_prediction``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dataset import DataSets, build_datasets, prepare_data
from model import UNet, build_model
from segmentation.checkpoints import Progress, check_architecture, find_best_checkpoint, read_checkpoint
from segmentation.config import DEFAULT_CONFIG, Config, load_config, merge_overrides, resolve
from segmentation.console import note
from segmentation.device import resolve_device
from segmentation.inference.infer import Predictor
from segmentation.plan import Plan, stored_plan


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
        prepared = prepare_data(data, unet.image_channels, unet.num_classes, seed, note)
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
) -> Trained:
    """The model and predictor of ``checkpoint`` (default: the newest ``best.pt`` under
    ``train.save_path``), with the config stored in it or the one at ``config_path`` and
    ``section.key=value`` overrides on top (the architecture must match the checkpoint's), test-time
    augmentation where ``tta`` or ``predict.tta`` asks for it, on ``device`` (default: ``train.device``).
    A note says when ``predict.threshold: auto`` finds no calibrated threshold, unless ``calibrating``."""
    if checkpoint is None:
        save_path = Path(load_config(config_path or DEFAULT_CONFIG, overrides).run.save_path)
        checkpoint = find_best_checkpoint(save_path)
    state = read_checkpoint(checkpoint)
    notices: list[str] = []
    config = (
        load_config(config_path, overrides, notices)
        if config_path
        else resolve(merge_overrides(state["config"], overrides), notices)
    )
    for message in notices:
        note(message)
    check_architecture(state, config.unet, checkpoint)
    plan = stored_plan(state, config, str(checkpoint))
    device = device or resolve_device(config.train.device)
    model = build_model(config.unet, plan.boundary_class).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    uncalibrated = config.predict.threshold == "auto" and plan.threshold_source == "uncalibrated"
    if uncalibrated and plan.num_classes == 2 and not calibrating:
        note(
            f"predict.threshold=auto but {checkpoint} holds no calibrated threshold "
            "(it is stored at the end of training): using 0.5"
        )
    predictor = Predictor.from_plan(model, plan, config.predict, config.augment, config.data.image_scale, tta)
    progress = Progress.from_dict(state["progress"], checkpoint)
    return Trained(model, predictor, config, plan, progress, checkpoint, device, state)
