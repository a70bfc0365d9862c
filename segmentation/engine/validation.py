"""Validation during training: the loss and scores of whole images, and the decision threshold calibrated on them.

Images are predicted tile by tile exactly as ``test.py`` predicts them (``infer.predict_with_config``),
so the logged scores are the ones ``test.py`` reproduces.
"""

from __future__ import annotations

from pathlib import Path

import torch

from losses import segmentation_loss
from model import build_model
from segmentation.engine.checkpoint import read_checkpoint, save_checkpoint
from segmentation.engine.distributed import gather_from_processes
from segmentation.inference.infer import calibrate_threshold, predict_with_config, predicted_classes
from segmentation.metrics import image_scores, pool_scores


def evaluate(
    model: torch.nn.Module, dataset, device: torch.device, config: dict, rank: int = 0, world_size: int = 1
) -> dict[str, float]:
    """Loss and scores on whole validation images, predicted tile by tile exactly as test.py does.

    ``val_pixel_error``, ``val_dice`` and ``val_iou`` pool the pixels of all images; for two classes,
    ``val_rand_error`` and ``val_vi`` (the ISBI 2012 measures on the cells) are means over the images.
    Two classes are told apart as ``infer.predicted_classes`` says, at ``predict.threshold`` (0.5 while
    it is ``auto``, not yet calibrated). ``uniform_images`` counts the images predicted as a single
    class everywhere (not a column of metrics.csv). With several processes each predicts every
    ``world_size``-th image and all of them get the scores of all images.
    """
    predict, num_classes = config["predict"], config["unet"]["num_classes"]
    threshold = 0.5 if predict["threshold"] == "auto" else predict["threshold"]
    losses, cell_scores, uniform = [], [], 0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for index in range(rank, len(dataset), world_size):
        image, label, weight = dataset[index]
        probabilities = predict_with_config(model, image.to(device), config).cpu()
        # log-probabilities are logits whose softmax is the probabilities, so the training loss applies
        log_probabilities = probabilities.clamp_min(1e-12).log()[None]
        losses.append(segmentation_loss(config["train"]["loss"], log_probabilities, label[None], weight[None]).item())
        classes = predicted_classes(probabilities, threshold, predict["watershed_seeds"], predict["watershed_min_seed"])
        uniform += int(classes.min() == classes.max())
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
    scores = {f"val_{key}": value for key, value in pool_scores(confusion, cell_scores).items()}
    return {"val_loss": sum(losses) / len(losses), **scores, "uniform_images": uniform}


def calibrate(checkpoint_path: Path, dataset, device: torch.device, config: dict) -> float:
    """``predict.threshold: auto``: find the class-1 probability threshold that gives the best
    ``train.best_metric`` (pixel error for ``val_loss``) on the validation images with the checkpoint's
    weights, store it in the checkpoint for test.py, and return it."""
    state = read_checkpoint(checkpoint_path)
    model = build_model(config["unet"]).to(device)
    model.load_state_dict(state["model"])
    predict = config["predict"]
    cell_probabilities, labels = [], []
    for image, label, _ in dataset:
        probabilities = predict_with_config(model, image.to(device), config)
        cell_probabilities.append(probabilities[1].cpu().numpy())
        labels.append(label.numpy())
    metric = config["train"]["best_metric"].removeprefix("val_").replace("loss", "pixel_error")
    threshold, table = calibrate_threshold(
        cell_probabilities, labels, metric, predict["watershed_seeds"], predict["watershed_min_seed"]
    )
    save_checkpoint(checkpoint_path, {**state, "threshold": threshold, "threshold_table": table})
    at = {row["threshold"]: row for row in table}
    print(
        f"calibrated predict.threshold on {len(labels)} validation images: {threshold:.2f} ({metric} {at[threshold][metric]:.4f}; at 0.50: {at[0.5][metric]:.4f}), stored in {checkpoint_path}"
    )
    return threshold
