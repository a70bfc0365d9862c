"""Check that a set-up can learn at all, and tune it cheaply, by overfitting one batch.

    python training.py overfit_one_batch.overfit=true     # one fixed batch until its loss < tolerance
    python training.py overfit_one_batch.hp_search=true   # the same once per point of search_space
    python training.py overfit_one_batch.lr_find=true     # learning-rate range test (Smith 2017)

A model that cannot drive its loss on one fixed batch towards zero has a bug, a far-off learning rate or
data it cannot learn from; how fast it gets there is a cheap first signal for ranking settings. All
three modes train with ``step.train_step``, the step of full training (same loss, weight map
included), and write to their own folder ``train.log_path/<date>_<time>-<mode>/``.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from dataset import EpochSampler, TileDataset, planned_datasets
from model import build_model, center_crop
from segmentation.config import Config, ConfigError, UserError, config_to_yaml
from segmentation.console import note
from segmentation.data.augment import augment_on_device
from segmentation.device import resolve_device
from segmentation.engine.step import build_optimizer, train_step
from segmentation.plan import Plan, training_tile_size
from segmentation.runs.figures import plot_losses, plot_lr_find
from segmentation.runs.folders import new_run_folder
from segmentation.settings import DataSettings, OverfitSettings, TrainSettings, UNetSettings

# unet keys that change the optimisation but not the data: trials differing only in these (and in the
# optimisation's train keys) share one data set.
UNET_OPTIMISATION_KEYS = ("norm", "upsample", "dropout")
SMOOTHING = 0.98  # lr_find: weight of the past in the exponential moving average of the loss (fastai's)


# ---------------------------------------------------------------------------------------------------
# One fixed batch, and fitting a fresh model to it
# ---------------------------------------------------------------------------------------------------


def planned_tiles(config: Config) -> tuple[Plan, TileDataset]:
    """The run's plan, decided from the configured data, and its training tiles: what the checks fit."""
    plan, datasets = planned_datasets(config.unet, config.data, config.predict, config.train.seed, note)
    return plan, datasets.train


def fixed_batch(train_set: TileDataset, plan: Plan, train: TrainSettings) -> tuple[list[torch.Tensor], list[str]]:
    """The first ``train.batch_size`` tiles of the training order of epoch 0, unaugmented, and warnings.

    Returns ``[image (B, C, T, T) float32, label (B, T, T) int64, weight (B, T, T) float32]`` on the CPU;
    every call, and every trial whatever its batch size, starts with the same tiles. Labels that are not
    classes are an error (the loss cannot use them); one class alone in the labelled output region is a
    warning: predicting that class everywhere fits it, so reaching the tolerance proves little.
    """
    check_batch_fits(train.batch_size, len(train_set))
    order = list(EpochSampler(len(train_set), train.seed))[: train.batch_size]
    batch = [torch.stack(tensors) for tensors in zip(*(train_set[i] for i in order))]
    labelled = plan.output_size
    classes = center_crop(batch[1], labelled, labelled).unique().tolist()
    if classes[-1] >= plan.label_classes:
        raise UserError(
            f"the batch holds label {classes[-1]} but unet.num_classes is {plan.num_classes} "
            f"(labels 0..{plan.num_classes - 1}): raise unet.num_classes or fix the masks"
        )
    if len(classes) == 1:
        return batch, [
            f"only class {classes[0]} in the batch's labelled output: a model fits it by predicting that class "
            "everywhere; try another train.seed or a larger train.batch_size"
        ]
    return batch, []


def fold_of(data: DataSettings) -> int | None:
    """The fold a check runs on under cross-validation (``train.fold``; None without folds)."""
    return data.fold if data.folds else None


def check_batch_fits(batch_size: int, tiles: int) -> None:
    """A UserError when ``train.batch_size`` is more than the training tiles of an epoch."""
    if batch_size > tiles:
        raise UserError(
            f"train.batch_size={batch_size} is more than the {tiles} training tiles: "
            "lower it or raise train.samples_per_image"
        )


def fit_one_batch(
    unet: UNetSettings,
    plan: Plan,
    train: TrainSettings,
    settings: OverfitSettings,
    batch: list[torch.Tensor],
    device: torch.device,
    log_every: int = 0,
) -> dict:
    """Train a fresh model on ``batch`` at the constant ``train.lr`` until its loss < tolerance.

    The weights start from ``torch.manual_seed(train.seed)``: runs of one architecture start alike.
    Returns ``losses`` (per step, before that step's update), ``steps`` (= len(losses)), ``final_loss``,
    ``reached``, ``diverged`` (a NaN or infinite loss, which stops at once) and ``seconds``.
    """
    torch.manual_seed(train.seed)
    model = build_model(unet, plan.boundary_class).to(device)
    optimizer = build_optimizer(model, train, device)
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(1, settings.max_steps + 1):
        loss = train_step(model, optimizer, batch, train.loss, train.grad_clip, device).item()
        losses.append(loss)
        stop = not math.isfinite(loss) or loss < settings.tolerance
        if log_every and (step == 1 or step % log_every == 0 or stop):
            print(f"step {step:5d}  loss {loss:.6g}", flush=True)
        if stop:
            break
    final = losses[-1]
    return {
        "losses": losses,
        "steps": len(losses),
        "final_loss": final,
        "reached": final < settings.tolerance,
        "diverged": not math.isfinite(final),
        "seconds": time.perf_counter() - start,
    }


def verdict(result: dict, train: TrainSettings, settings: OverfitSettings) -> list[str]:
    """The outcome of ``fit_one_batch`` in words: a verdict line, then ``hint:`` lines on what to change."""
    steps, tolerance, final = result["steps"], settings.tolerance, result["final_loss"]
    if result["reached"]:
        return [f"reached tolerance {tolerance:g} in {steps} steps ({result['seconds']:.1f} s)"]
    lower = f"lower train.lr (now {train.lr:g})" + ("" if train.grad_clip else " or clip gradients (train.grad_clip)")
    if result["diverged"]:
        return [f"diverged at step {steps}: the loss became {final}", f"hint: {lower}"]
    first, lowest, highest = result["losses"][0], min(result["losses"]), max(result["losses"])
    lines = [
        f"did not reach tolerance {tolerance:g} after {steps} steps: final loss {final:.4g} "
        f"(first {first:.4g}, lowest {lowest:.4g})"
    ]
    if final > 1.1 * first or highest > 1.5 * first:
        lines.append(f"hint: the loss rose (up to {highest:.4g}): {lower}")
    elif final > 2 * lowest:
        lines.append(f"hint: the loss oscillated (it ended at {final / lowest:.1f}x its lowest): {lower}")
    elif final > 0.9 * first:
        lines.append(f"hint: the loss fell by less than 10 %: raise train.lr (now {train.lr:g})")
    else:
        lines.append(
            f"hint: the loss is still falling: raise overfit_one_batch.max_steps (now {settings.max_steps}) "
            "or train.lr, or loosen overfit_one_batch.tolerance"
        )
    return lines


def overfit_batch(config: Config, config_text: str) -> dict:
    """``overfit_one_batch.overfit``: fit one fixed batch, print the loss and a verdict, plot ``loss.png``
    into a new run folder, which keeps ``config_text`` (the run's settings as YAML).

    Returns ``fit_one_batch``'s result with ``verdict`` (the printed lines) and ``run_log``.
    """
    train, settings = config.train, config.overfit_one_batch
    device = resolve_device(train.device)
    plan, tiles = planned_tiles(config)
    batch, warnings = fixed_batch(tiles, plan, train)
    run_log = new_run_folder(config.run, "overfit", config_text, fold_of(config.data))
    print(
        f"overfitting one fixed batch of {train.batch_size} unaugmented {plan.tile_size} px tiles on {device}: "
        f"{train.optim} at constant lr {train.lr:g}, until the loss < {settings.tolerance:g} or "
        f"{settings.max_steps} steps; loss curve in {run_log / 'loss.png'}",
        flush=True,
    )
    on_device = [tensor.to(device) for tensor in batch]
    result = fit_one_batch(config.unet, plan, train, settings, on_device, device, settings.logging_steps)
    title = f"one fixed batch: {train.optim}, lr {train.lr:g}"
    plot_losses({"loss": result["losses"]}, run_log / "loss.png", title, settings.tolerance)
    lines = verdict(result, train, settings)
    print(f"verdict: {lines[0]}", *lines[1:], *(f"note: {warning}" for warning in warnings), sep="\n")
    return {**result, "verdict": lines, "run_log": run_log}


# ---------------------------------------------------------------------------------------------------
# Hyperparameter search: every trial overfits the same batch from the same start
# ---------------------------------------------------------------------------------------------------


def grid_values(value_range: dict, points: int) -> list[float]:
    """``points`` values from low to high of ``{log_uniform | uniform: [low, high]}``, evenly spaced
    (on a log scale for log_uniform)."""
    ((kind, (low, high)),) = value_range.items()
    return (np.geomspace if kind == "log_uniform" else np.linspace)(low, high, points).tolist()


def draw(choices: list | dict, rng: np.random.Generator) -> Any:
    """One random value: a list's element, or a number from ``{log_uniform | uniform: [low, high]}``."""
    if isinstance(choices, list):
        return copy.deepcopy(choices[rng.integers(len(choices))])
    ((kind, (low, high)),) = choices.items()
    if kind == "log_uniform":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return float(rng.uniform(low, high))


def search_points(settings: OverfitSettings) -> list[dict]:
    """The trials' values ``{section.key: value}`` from the ``overfit_one_batch`` settings: every
    combination of the grid, or ``trials`` draws from ``search_seed``."""
    space = settings.search_space
    if settings.search_method == "grid":
        axes = [
            choices if isinstance(choices, list) else grid_values(choices, settings.grid_points)
            for choices in space.values()
        ]
        return [dict(zip(space, values)) for values in itertools.product(*axes)]
    rng = np.random.default_rng(settings.search_seed)
    return [{name: draw(choices, rng) for name, choices in space.items()} for _ in range(settings.trials)]


def describe(values: dict) -> str:
    """``train.lr=0.00123 train.optim=adam``: a trial's values, briefly."""
    return " ".join(
        f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}" for name, value in values.items()
    )


def trial_configs(config: Config, points: list[dict]) -> list[Config]:
    """``config`` with each point's values set, each validated as a whole before any trial runs: a
    ConfigError names the first trial that does not work and why."""
    configs = []
    for number, values in enumerate(points, 1):
        where = f"overfit_one_batch.search_space: trial {number} ({describe(values)})"
        try:
            trial = config.with_values(values)
            training_tile_size(trial.data.tile_size, trial.unet.depth, trial.unet.padding)
        except ConfigError as error:
            raise ConfigError([f"{where}: {problem}" for problem in error.problems]) from None
        except UserError as error:
            raise ConfigError([f"{where}: {error}"]) from None
        configs.append(trial)
    return configs


def data_key(unet: UNetSettings, data: DataSettings, seed: int) -> tuple:
    """What the training tiles depend on: the ``unet`` settings but for the optimisation's, the data
    settings and ``train.seed``."""
    return dataclasses.replace(unet, **dict.fromkeys(UNET_OPTIMISATION_KEYS)), data, seed


def ranking_key(result: dict) -> tuple:
    """Sort key of a trial: reached the tolerance first (fewest steps), then the lowest final loss, diverged last."""
    if result["diverged"]:
        return (2, 0.0)
    return (0, result["steps"]) if result["reached"] else (1, result["final_loss"])


def hp_search(config: Config) -> dict:
    """``overfit_one_batch.hp_search``: overfit one batch per point of ``search_space`` and rank them.

    Writes ``trials.csv`` (ranked), ``trials.png`` and ``best_config.yaml`` (the best trial's config,
    modes off) to the run folder, also after Ctrl-C for the trials finished by then. A diverging trial
    is recorded and the search goes on. Returns ``results`` (ranked), ``interrupted``, ``run_log`` and,
    with ``full_train`` (unless interrupted or every trial diverged), ``full_train_config``: the best
    config, modes off, for training.py to train.
    """
    settings = config.overfit_one_batch
    points = search_points(settings)
    configs = trial_configs(config, points)
    device = resolve_device(config.train.device)
    run_log = new_run_folder(config.run, "hp_search", config_to_yaml(config), fold_of(config.data))
    print(
        f"hp search: {len(configs)} trials ({settings.search_method}) over {', '.join(settings.search_space)}, "
        f"each fitting one fixed batch from the same start until the loss < {settings.tolerance:g} or "
        f"{settings.max_steps} steps; results in {run_log}",
        flush=True,
    )
    train_sets, results, interrupted = {}, [], False
    try:
        for number, (values, trial) in enumerate(zip(points, configs), 1):
            key = data_key(trial.unet, trial.data, trial.train.seed)
            if key not in train_sets:
                train_sets[key] = planned_tiles(trial)
            plan, tiles = train_sets[key]
            batch, warnings = fixed_batch(tiles, plan, trial.train)
            for warning in warnings:
                note(warning)
            on_device = [tensor.to(device) for tensor in batch]
            result = fit_one_batch(trial.unet, plan, trial.train, trial.overfit_one_batch, on_device, device)
            results.append({"trial": number, "values": values, "config": trial, **result})
            outcome = verdict(result, trial.train, trial.overfit_one_batch)[0]
            print(f"trial {number}/{len(configs)}  {describe(values)}: {outcome}", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print(f"\nstopped: keeping the {len(results)} finished trial(s)", file=sys.stderr)
    summary = {"results": sorted(results, key=ranking_key), "interrupted": interrupted, "run_log": run_log}
    if not results:
        return summary
    rows = write_trials(run_log / "trials.csv", summary["results"], list(settings.search_space))
    curves = {f"{r['trial']}: {describe(r['values'])}": r["losses"] for r in results}
    plot_losses(curves, run_log / "trials.png", "hp search: loss on one fixed batch per trial", settings.tolerance)
    print_table(rows[:5])
    best = summary["results"][0]
    best_path = run_log / "best_config.yaml"
    modes_off = {f"overfit_one_batch.{mode}": False for mode in ("overfit", "hp_search", "lr_find", "full_train")}
    trainable = best["config"].with_values(modes_off)
    best_path.write_text(config_to_yaml(trainable))
    print(
        f"best: trial {best['trial']} ({describe(best['values'])}); train it with: python training.py --config "
        f"{best_path}"
    )
    if best["diverged"]:
        note("every trial diverged: lower the learning rates of search_space")
    elif settings.full_train and not interrupted:
        summary["full_train_config"] = trainable
    return summary


def write_trials(path: Path, ranked: list[dict], names: list[str]) -> list[dict]:
    """Write one CSV row per trial, best first; returns the rows."""
    rows = [
        {
            "rank": rank,
            "trial": r["trial"],
            **r["values"],
            "steps": r["steps"],
            "final_loss": r["final_loss"],
            "reached": r["reached"],
            "diverged": r["diverged"],
            "seconds": round(r["seconds"], 2),
        }
        for rank, r in enumerate(ranked, 1)
    ]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(
            file, fieldnames=["rank", "trial", *names, "steps", "final_loss", "reached", "diverged", "seconds"]
        )
        writer.writeheader()
        writer.writerows(rows)
    return rows


def print_table(rows: list[dict]) -> None:
    """Print rows of equal keys as a right-aligned text table."""
    cells = [[f"{value:.4g}" if isinstance(value, float) else str(value) for value in row.values()] for row in rows]
    widths = [max(len(name), *(len(line[i]) for line in cells)) for i, name in enumerate(rows[0])]
    for line in [list(rows[0]), *cells]:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))


# ---------------------------------------------------------------------------------------------------
# Learning-rate range test (Smith 2017, "Cyclical learning rates"; as fastai's lr_find)
# ---------------------------------------------------------------------------------------------------


def suggest_lr(lrs: list[float], smoothed: list[float]) -> tuple[float, str]:
    """The lr where the smoothed loss falls fastest per unit of log lr, looked for between the first tenth
    of the points (the average is still young) and the lowest loss; or, where that leaves fewer than 3
    points, the lr of the lowest loss / 10. Returns ``(lr, which rule)``."""
    lowest = int(np.nanargmin(smoothed))
    start = len(smoothed) // 10
    if lowest - start + 1 >= 3:
        slopes = np.gradient(np.asarray(smoothed[start : lowest + 1]), np.log(lrs[start : lowest + 1]))
        return lrs[start + int(np.argmin(slopes))], "steepest descent of the smoothed loss"
    return max(lrs[lowest] / 10, lrs[0]), "lr of the lowest smoothed loss / 10"


def lr_find(config: Config, config_text: str) -> dict:
    """``overfit_one_batch.lr_find``: the learning-rate range test.

    A fresh model trains on augmented training batches, as in training, with the lr rising exponentially
    per step from ``lr_find_min`` to ``lr_find_max`` over ``lr_find_steps`` steps; the exponentially
    smoothed loss is recorded, and the test stops early once it exceeds 4x its minimum or is not finite.
    Writes ``lr_find.png`` to a new run folder, which keeps ``config_text`` (the run's settings as YAML),
    and prints the suggested lr. Returns ``lr``, ``rule``, ``lrs``, ``losses``, ``smoothed`` and ``run_log``.
    """
    train, augment, settings = config.train, config.augment, config.overfit_one_batch
    device = resolve_device(train.device)
    plan, train_set = planned_tiles(config)
    check_batch_fits(train.batch_size, len(train_set))
    run_log = new_run_folder(config.run, "lr_find", config_text, fold_of(config.data))
    torch.manual_seed(train.seed)
    model = build_model(config.unet, plan.boundary_class).to(device)
    optimizer = build_optimizer(model, train, device)
    model.train()
    sampler = EpochSampler(len(train_set), train.seed)
    loader = DataLoader(train_set, train.batch_size, sampler=sampler, drop_last=True, num_workers=train.num_workers)

    def batches():
        for epoch in itertools.count():  # as many epochs as the steps need
            sampler.set_epoch(epoch)
            yield from loader

    print(
        f"lr range test: lr from {settings.lr_find_min:g} to {settings.lr_find_max:g} over at most "
        f"{settings.lr_find_steps} steps on {device}; plot in {run_log / 'lr_find.png'}",
        flush=True,
    )
    lrs, losses, smoothed, average = [], [], [], 0.0
    schedule = np.geomspace(settings.lr_find_min, settings.lr_find_max, settings.lr_find_steps).tolist()
    for step, (lr, batch) in enumerate(zip(schedule, batches())):
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = augment_on_device(batch, augment, train.seed, step, device)
        loss = train_step(model, optimizer, batch, train.loss, train.grad_clip, device).item()
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        lrs.append(lr)
        losses.append(loss)
        smoothed.append(average / (1 - SMOOTHING ** (step + 1)))  # corrects the average's bias towards its start at 0
        if (step + 1) % settings.logging_steps == 0:
            print(f"step {step + 1:5d}  lr {lr:.3g}  loss {loss:.4g}  smoothed {smoothed[-1]:.4g}", flush=True)
        if not math.isfinite(smoothed[-1]) or smoothed[-1] > 4 * min(smoothed):
            print(
                f"stopped at step {step + 1} (lr {lr:.3g}): the smoothed loss {smoothed[-1]:.4g} is above 4x its "
                "lowest",
                flush=True,
            )
            break
    lr, rule = suggest_lr(lrs, smoothed)
    plot_lr_find(lrs, losses, smoothed, lr, run_log / "lr_find.png")
    print(f"suggested lr {lr:.2g} ({rule}); train with: python training.py train.lr={lr:.2g}")
    return {"lr": lr, "rule": rule, "lrs": lrs, "losses": losses, "smoothed": smoothed, "run_log": run_log}
