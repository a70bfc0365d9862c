"""Validation during training: the loss and scores of whole images, and the decision threshold calibrated on them.

Images are predicted tile by tile exactly as ``test.py`` predicts them (``infer.Predictor``), so the
logged scores are the ones ``test.py`` reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from losses import scored_classes, segmentation_loss
from segmentation.checkpoints import read_checkpoint, save_checkpoint
from segmentation.engine.distributed import gather_from_processes
from segmentation.inference.infer import Predictor, calibrate_threshold
from segmentation.metrics import image_scores, pool_scores
from segmentation.plan import Plan
from segmentation.settings import HIGHER_IS_BETTER


@dataclass
class Validation:
    """What ``evaluate`` measured: the mean ``loss`` over the images, the pooled ``scores`` (``pool_scores``:
    ``pixel_error``, ``dice``, ``iou``, ``dice_<c>`` of more than two classes, ``rand_error`` and ``vi``
    of two), ``uniform_images`` (predicted as a single class everywhere) and ``examples`` (name, image,
    label, classes) of the first images, where asked for."""

    loss: float
    scores: dict[str, float]
    uniform_images: int = 0
    examples: list = field(default_factory=list)

    def row(self) -> dict[str, float]:
        """The validation columns of metrics.csv: ``val_loss`` and ``val_<score>``."""
        return {"val_loss": self.loss, **{f"val_{key}": value for key, value in self.scores.items()}}

    def value(self, metric: str) -> float:
        """The value of ``train.best_metric`` (``val_loss``, ``val_dice``, ...)."""
        return self.row()[metric]


def evaluate(
    predictor: Predictor, dataset, loss_kind: str, rank: int = 0, world_size: int = 1, keep: int = 0
) -> Validation:
    """Loss and scores on whole validation images, predicted tile by tile exactly as test.py does.

    ``val_pixel_error``, ``val_dice`` and ``val_iou`` pool the pixels of all images; for two classes,
    ``val_rand_error`` and ``val_vi`` (the ISBI 2012 measures on the cells) are means over the images.
    Pixels' classes are decided by ``predictor.classes`` (at ``predict.threshold``, 0.5 while it is
    ``auto``, not yet calibrated). ``loss_kind`` is ``train.loss``. ``uniform_images`` counts the images
    predicted as a single class everywhere (not a column of metrics.csv). With several processes each
    predicts every ``world_size``-th image and all of them get the scores of all images. With ``keep``,
    ``examples`` holds (name, image (C, H, W), label (H, W), classes (H, W)) of this process's first
    ``keep`` images, for pictures of the predictions.
    """
    num_classes = predictor.model.num_classes
    losses, cell_scores, uniform, examples = [], [], 0, []
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for index in range(rank, len(dataset), world_size):
        image, label, weight = dataset[index]
        probabilities = predictor.probabilities(image.to(predictor.device)).cpu()
        # log-probabilities are logits whose softmax is the probabilities, so the training loss applies
        log_probabilities = probabilities.clamp_min(1e-12).log()[None]
        losses.append(segmentation_loss(loss_kind, log_probabilities, label[None], weight[None]).item())
        classes = predictor.classes(probabilities)
        label = scored_classes(label, num_classes)  # the boundary class, where the network has it, is its object's
        uniform += int(classes.min() == classes.max())
        if len(examples) < keep:
            examples.append((dataset.names[index], image.numpy(), label.numpy(), classes.numpy()))
        image_confusion, cells = image_scores(classes, label, num_classes)
        confusion += image_confusion
        if cells:
            cell_scores.append(cells)
    if world_size > 1:
        shards = gather_from_processes((losses, confusion, cell_scores, uniform), world_size)
        losses = [loss for shard in shards for loss in shard[0]]
        confusion = sum(shard[1] for shard in shards)
        cell_scores = [scores for shard in shards for scores in shard[2]]
        uniform = sum(shard[3] for shard in shards)
    return Validation(sum(losses) / len(losses), pool_scores(confusion, cell_scores), uniform, examples)


def calibrate(predictor: Predictor, dataset, metric: str) -> tuple[float, list[dict[str, float]]]:
    """``predict.threshold: auto``: the class-1 probability threshold that gives the best ``metric``
    (``pixel_error``, ``dice``, ``iou``, ``rand_error`` or ``vi``) on the validation images, with the
    predictor's watershed cut; returns it and the table of every candidate (``calibrate_threshold``)."""
    cell_probabilities, labels = [], []
    for image, label, _ in dataset:
        probabilities = predictor.class_probabilities(predictor.probabilities(image.to(predictor.device)).cpu())
        cell_probabilities.append(probabilities[1].numpy())
        labels.append(scored_classes(label, 2).numpy())
    settings = predictor.settings
    # with the border class, watershed_seeds seeds the objects' insides, not a cut of class 1
    seeds = None if predictor.model.boundary_class else settings.watershed_seeds
    return calibrate_threshold(cell_probabilities, labels, metric, seeds, settings.watershed_min_seed)


def calibrate_checkpoint(
    checkpoint_path: Path, plan: Plan, predictor: Predictor, dataset, best_metric: str
) -> tuple[Plan, str]:
    """``predict.threshold: auto`` after training: ``calibrate`` the best checkpoint's ``predictor`` on the
    validation images for ``train.best_metric`` (``calibration_metric``), store the threshold in the
    checkpoint's ``plan``; returns that plan and the line that says so."""
    score = calibration_metric(best_metric)
    threshold, table = calibrate(predictor, dataset, score)
    calibrated = plan.calibrated(threshold)
    store_plan(checkpoint_path, calibrated, table)
    at = {row["threshold"]: row for row in table}
    return calibrated, (
        f"calibrated predict.threshold on {len(dataset)} validation images: {threshold:.2f} "
        f"({score} {at[threshold][score]:.4f}; at 0.50: {at[0.5][score]:.4f}), stored in {checkpoint_path}"
    )


def store_plan(checkpoint_path: Path, plan: Plan, table: list[dict[str, float]]) -> None:
    """Write a plan with its calibrated threshold, and the calibration's table, into a checkpoint."""
    state = read_checkpoint(checkpoint_path)
    save_checkpoint(checkpoint_path, {**state, "plan": plan.to_dict(), "threshold_table": table})


def calibration_metric(best_metric: str) -> str:
    """The score that ``predict.threshold: auto`` optimises for ``train.best_metric``: the metric itself,
    pixel error for ``val_loss``."""
    return best_metric.removeprefix("val_").replace("loss", "pixel_error")


def improved(value: float, best: float | None, metric: str) -> bool:
    """Whether ``value`` of ``train.best_metric`` beats ``best`` (None: nothing to beat yet)."""
    if best is None:
        return True
    return value > best if metric in HIGHER_IS_BETTER else value < best
