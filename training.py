"""Train a U-Net (Ronneberger et al. 2015) from a YAML config: the command line and the training loop.

    python training.py [--config config.yaml] [section.key=value ...]

for example ``python training.py train.lr=3e-4 unet.input_channels=[16,32,64,128]``. Each run writes
its resolved config, ``metrics.csv``, ``curves.png`` and a weight-map figure to ``log_path/<run>/`` and
its checkpoints ``last.pt`` and ``best.pt`` to ``save_path/<run>/``. ``train.resume=auto`` continues the
newest run exactly where it stopped; Ctrl-C saves ``last.pt`` first. ``overfit_one_batch.overfit=true``,
``hp_search=true`` or ``lr_find=true`` run a check of ``segmentation.engine.search`` instead of training
(an overfit that misses its tolerance exits with code 1). Under ``torchrun --nproc_per_node=N`` every
process trains its shard of the tiles (DistributedDataParallel) and process 0 alone prints, logs and saves.

The loop (``train_process``) reads as its phases: set up, then for each epoch train, validate, log
and save. The config is read once (``segmentation.config``) and each library function gets the section
or the values it needs: the step from ``segmentation.engine.step``, the data from ``dataset.py``,
checkpoints from ``segmentation.engine.checkpoint``, validation from ``segmentation.engine.validation``,
run folders and figures from ``segmentation.runs``, the processes from ``segmentation.engine.distributed``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import DataSets, EpochSampler, build_datasets, count_steps, decided_unet
from model import build_model, count_parameters
from segmentation.config import DEFAULT_CONFIG, Config, UserError, config_to_yaml, load_config
from segmentation.console import first_line, note, report_error
from segmentation.data.augment import augment_on_device
from segmentation.device import bf16_supported, out_of_memory_advice, prepare_device
from segmentation.engine import search
from segmentation.engine.checkpoint import (
    check_architecture,
    find_resume_checkpoint,
    finished,
    load_checkpoint,
    load_initial_weights,
    newest_fold_series,
    read_checkpoint,
    read_initial_weights,
    restore,
    save_checkpoint,
    training_state,
)
from segmentation.engine.distributed import from_rank_zero, process_group, share_buffers, sum_over_processes
from segmentation.engine.restarts import continued_after_restart, lost_process, publish_run
from segmentation.engine.signals import stop_requests
from segmentation.engine.step import build_optimizer, build_scheduler, loss_cure, train_step, update_ema
from segmentation.engine.validation import calibrate_checkpoint, evaluate, improved
from segmentation.inference.infer import Predictor, uniform_prediction_note
from segmentation.inference.objects import object_rules
from segmentation.runs.figures import plot_curves, save_check_figures
from segmentation.runs.folders import (
    epoch_line,
    new_run_name,
    read_metrics,
    run_base_name,
    start_run_folders,
    write_metrics,
)
from segmentation.runs.tensorboard import open_writer, require_tensorboard, write_epoch, write_settings

CHECK_EVERY = 10  # steps between reading the loss on the host (a device sync) for the bar and the NaN check
TENSORBOARD_IMAGES = 3  # validation images shown with truth and prediction in TensorBoard at each validation


@dataclass
class Run:
    """What one training process works with, as ``set_up`` builds it.

    ``model`` is the bare network; ``step_model`` takes the steps: the same network, wrapped by
    DistributedDataParallel and torch.compile where those are on. ``ema_model`` (``train.ema``) is the
    moving average of ``model``'s weights; validation and best.pt use ``predict_model``, the average
    where there is one, through ``predictor``. ``progress`` (epoch, batch, step, best value and its
    epoch, loss sum, run name) goes into every checkpoint; ``rows`` are the metrics.csv rows so far.
    """

    config: Config
    rank: int
    world_size: int
    device: torch.device
    data: DataSets
    model: torch.nn.Module
    ema_model: torch.nn.Module | None
    step_model: torch.nn.Module
    predictor: Predictor
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    sampler: EpochSampler
    loader: DataLoader
    steps_per_epoch: int
    progress: dict
    run_log: Path
    run_weights: Path
    rows: list[dict]
    writer: object | None = None  # train.tensorboard's SummaryWriter, in process 0
    compiling: bool = False  # until the first step of a torch.compile'd model has run
    warned_uniform: bool = False  # the note on predictions of a single class is given once
    objects: dict = dataclasses.field(default_factory=dict)  # DataSets.object_record(): id masks? learnt object size
    last_saved: float = dataclasses.field(default_factory=time.monotonic)  # when last.pt was written

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    @property
    def predict_model(self) -> torch.nn.Module:
        return self.model if self.ema_model is None else self.ema_model

    def state(self) -> dict:
        """The run as it stands, as a checkpoint."""
        settings = self.config.to_dict()
        parts = (self.model, self.optimizer, self.scheduler, self.scaler, settings, self.progress, self.device)
        return {**training_state(*parts, self.ema_model), "objects": self.objects}

    def save_last(self) -> None:
        """metrics.csv, then last.pt at the current step (process 0): a run killed after this resumes
        here with every row."""
        write_metrics(self.run_log / "metrics.csv", self.rows)
        save_checkpoint(self.run_weights / "last.pt", self.state())
        self.last_saved = time.monotonic()

    def save_due(self) -> bool:
        """Whether ``train.save_minutes`` have passed since last.pt was written."""
        minutes = self.config.train.save_minutes
        return minutes > 0 and time.monotonic() - self.last_saved >= 60 * minutes

    def summary(self, interrupted: bool, scores: dict) -> dict:
        """What ``train`` returns: the trained model, run folders, progress (epoch, step, best value of
        ``train.best_metric`` and its epoch), the last validation scores, and whether it was interrupted."""
        return {
            "interrupted": interrupted,
            "model": self.predict_model,
            "run_log": self.run_log,
            "run_weights": self.run_weights,
            "scores": scores,
            **self.progress,
        }


def train(config: Config) -> dict:
    """Train as the config says, in this process or, under torchrun, in each of its processes; returns
    ``Run.summary``."""
    with process_group(config.train.device) as (rank, world_size, device):
        try:
            return train_process(config, rank, world_size, device)
        except torch.OutOfMemoryError:
            intact = "; the checkpoints saved so far are intact (continue with train.resume=auto)"
            raise UserError(out_of_memory_advice(device, config.train) + intact) from None
        except RuntimeError as error:  # gloo and NCCL report a process that is gone as a RuntimeError
            lost = lost_process(error, rank, world_size)
            if lost is None:
                raise
            raise lost from None


def train_process(config: Config, rank: int, world_size: int, device: torch.device) -> dict:
    """``train`` in process ``rank`` of ``world_size``: all of them train, process 0 alone prints, logs
    and saves."""
    run = set_up(config, rank, world_size, device)
    settings = config.train
    max_epochs, patience = settings.max_epochs, settings.early_stopping
    scores: dict = {}
    run.model.train()
    with stop_requests() as stop_requested, run.writer or contextlib.nullcontext():
        for epoch in range(run.progress["epoch"], max_epochs):
            # train: one pass over the tiles; a stop request ends it after a whole step, last.pt saved
            row = train_epoch(run, epoch, stop_requested)
            if row is None:
                return run.summary(True, scores)
            # validate: whole images, predicted as test.py predicts them; a better score saves best.pt
            last_epoch = epoch + 1 == max_epochs
            stop, examples = False, []
            if (epoch + 1) % settings.eval_epoch == 0 or last_epoch:
                scores = validate(run, epoch)
                examples = scores.pop("examples", [])
                row.update(scores)
                stop = patience > 0 and epoch + 1 - run.progress["best_epoch"] >= patience
            run.progress["stopped_early"] = stop  # in last.pt: train.fold=all skips such a run as finished
            # log: metrics.csv before last.pt, so that a run killed between the two resumes with every row
            run.rows.append(row)
            due = last_epoch or stop or bool(stop_requested)
            if run.main_process:
                tqdm.write(epoch_line(row, max_epochs))
                if (epoch + 1) % settings.log_epoch == 0 or due:
                    write_metrics(run.run_log / "metrics.csv", run.rows)
                    plot_curves(run.rows, run.run_log / "curves.png")
                if run.writer is not None:
                    write_epoch(run.writer, row, examples)
            # save
            if run.main_process and ((epoch + 1) % settings.save_epoch == 0 or due or run.save_due()):
                run.save_last()
            if stop_requested and world_size == 1:
                saved = f"saved {run.run_weights / 'last.pt'} after epoch {epoch + 1}"
                print(f"stopped: {saved}; continue with train.resume=auto", file=sys.stderr)
                return run.summary(True, scores)
            if stop:
                if run.main_process:
                    best = run.progress["best_epoch"]
                    print(
                        f"early stopping: no better {settings.best_metric} for {patience} epochs (best at epoch {best})"
                    )
                break
    if run.main_process:
        finish(run)
    return run.summary(False, scores)


def set_up(config: Config, rank: int, world_size: int, device: torch.device) -> Run:
    """Everything a training process needs, in an order that makes a run reproducible from its seed:
    the checkpoint to resume, the data, the model, optimizer and schedule, the run folders, the loader."""
    settings = config.train
    resume_path = from_rank_zero(find_resume_checkpoint(settings.resume, Path(settings.save_path)), world_size)
    checkpoint = load_checkpoint(resume_path, config.unet, settings) if resume_path else None
    # train.init_from applies to a new run; read and checked before anything is written
    initial = (
        read_initial_weights(Path(settings.init_from), config.unet) if settings.init_from and not checkpoint else None
    )
    if settings.tensorboard:
        require_tensorboard()  # a missing package stops the run before anything is written
    prepare_device(device, settings.precision)

    torch.manual_seed(settings.seed)
    data = build_datasets(config.unet, settings, note, rank, world_size)
    config = dataclasses.replace(config, unet=decided_unet(config.unet, data.train))
    if checkpoint:  # unet.boundary_class: auto, now decided by the masks, must be the checkpoint's
        check_architecture(checkpoint, config.unet, resume_path)
    batch_tiles = settings.batch_size * settings.grad_accum_steps
    steps_per_epoch = count_steps(len(data.train), batch_tiles, world_size)
    model, ema_model = build_models(config, device, initial)
    optimizer = build_optimizer(model, settings, device)
    scaler = torch.amp.GradScaler(device.type) if settings.precision == "fp16" else None
    scheduler = build_scheduler(optimizer, settings, steps_per_epoch)
    if checkpoint:
        progress = restore(checkpoint, model, optimizer, scheduler, scaler, device, ema_model)
    else:
        name = from_rank_zero(new_run_name(settings) if rank == 0 else None, world_size)
        progress = {"epoch": 0, "batch": 0, "step": 0, "best_value": None, "best_epoch": -1, "loss_sum": 0.0}
        progress["run_name"] = name
    name = progress["run_name"]
    run_log, run_weights = Path(settings.log_path) / name, Path(settings.save_path) / name
    writer = (
        start_logs(config, run_log, run_weights, progress, data, device, checkpoint is not None) if rank == 0 else None
    )
    predict_model = model if ema_model is None else ema_model
    objects = data.object_record()
    rules = object_rules(config.predict.min_object_size, config.predict.fill_holes, **objects)
    predictor = Predictor.from_settings(
        predict_model, config.predict, config.augment, settings.image_scale, rules=rules
    )
    sampler = EpochSampler(len(data.train), settings.seed, rank, world_size)
    loader = DataLoader(
        data.train,
        batch_tiles,
        sampler=sampler,
        drop_last=True,
        num_workers=settings.num_workers,
        persistent_workers=settings.num_workers > 0,
        pin_memory=device.type == "cuda",
    )
    run = Run(
        config=config,
        rank=rank,
        world_size=world_size,
        device=device,
        data=data,
        model=model,
        ema_model=ema_model,
        step_model=stepping_model(model, settings.compile, world_size, device),
        predictor=predictor,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        sampler=sampler,
        loader=loader,
        steps_per_epoch=steps_per_epoch,
        progress=progress,
        run_log=run_log,
        run_weights=run_weights,
        rows=read_metrics(run_log / "metrics.csv", progress["epoch"]),
        compiling=settings.compile,
        writer=writer,
        objects=objects,
    )
    if rank == 0:
        print_start(run, resume_path if checkpoint else None)
        if not checkpoint:
            run.save_last()  # from its first step a run has a last.pt: a kill resumes it, not an older run
        publish_run(run_weights)
    return run


def stepping_model(model: torch.nn.Module, compile: bool, world_size: int, device: torch.device) -> torch.nn.Module:
    """The model that takes the steps: wrapped by DistributedDataParallel (which all-reduces the gradients
    during the backward pass) in several processes, and by torch.compile under ``train.compile``."""
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if compile else model


def start_logs(
    config: Config,
    run_log: Path,
    run_weights: Path,
    progress: dict,
    data: DataSets,
    device: torch.device,
    resumed: bool,
):
    """In process 0: the run's folders and its settings in them; for a new run the figures to check by eye;
    with ``train.tensorboard`` the event writer (the settings as hparams for a new run). Returns the
    writer, or None."""
    start_run_folders(run_log, run_weights, config_to_yaml(config), progress["epoch"] if resumed else None)
    writer = open_writer(run_log, progress["epoch"]) if config.train.tensorboard else None
    if not resumed:
        save_check_figures(run_log, data.example, data.train, config.augment, config.train.seed, device)
        if writer is not None:
            write_settings(writer, config.to_dict())
    return writer


def build_models(
    config: Config, device: torch.device, initial: dict | None = None
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The network as ``unet`` describes it, started from the ``initial`` checkpoint's weights where there is
    one (``train.init_from``), laid out and checkpointed as ``train`` says, and its moving average under
    ``train.ema`` (None without)."""
    model = build_model(config.unet)
    if initial is not None:
        note(load_initial_weights(model, initial, Path(config.train.init_from)))
    model = model.to(device)
    model.activation_checkpointing = config.train.activation_checkpointing
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # a copy, not a new model: the same initial weights, and no draw from the seeded random stream
    ema_model = copy.deepcopy(model).requires_grad_(False) if config.train.ema > 0 else None
    return model, ema_model


def print_start(run: Run, resumed_from: Path | None) -> None:
    """The run's first lines: model, device, precision, tiles and steps per epoch, where it writes."""
    settings, world_size = run.config.train, run.world_size
    batch_size, accum_steps = settings.batch_size, settings.grad_accum_steps
    step_batch = batch_size * accum_steps * world_size
    split = f" = {batch_size} x {accum_steps} accumulated x {world_size} processes" if step_batch != batch_size else ""
    processes = f" in each of {world_size} processes" if world_size > 1 else ""
    lines = [
        f"U-Net {count_parameters(run.model):,} parameters on {run.device}{processes}, {settings.precision}; "
        f"{len(run.data.train)} tiles of {settings.tile_size} px per epoch ({run.steps_per_epoch} steps of "
        f"{step_batch}{split}), {len(run.data.val)} validation images",
        f"run {run.progress['run_name']}: logs in {run.run_log}, checkpoints in {run.run_weights}",
    ]
    if resumed_from:
        lines.append(f"resuming {resumed_from} at epoch {run.progress['epoch'] + 1}, batch {run.progress['batch']}")
    print("\n".join(lines), flush=True)


def train_epoch(run: Run, epoch: int, stop_requested: list) -> dict | None:
    """One pass over the training tiles, from the batch where a resumed epoch stopped; returns the
    epoch's metrics row, or None when a stop request ended the epoch early (last.pt saved)."""
    settings, progress = run.config.train, run.progress
    run.sampler.set_epoch(epoch, start=progress["batch"] * settings.batch_size * settings.grad_accum_steps)
    epoch_start, images_seen = time.perf_counter(), 0
    loss_sum = torch.tensor(progress["loss_sum"], device=run.device)
    bar = tqdm(
        total=run.steps_per_epoch,
        initial=progress["batch"],
        desc=f"epoch {epoch + 1}/{settings.max_epochs}",
        unit="step",
        dynamic_ncols=True,
        leave=False,
        disable=not run.main_process,
    )
    # a with block closes the bar on every way out, so that an error's one line starts a line of its own
    with bar:
        for batch in run.loader:
            batch = augment_on_device(
                batch, run.config.augment, settings.seed, progress["step"], run.device, run.rank, run.world_size
            )
            loss_sum += take_step(run, batch)
            run.scheduler.step()
            if run.ema_model is not None:
                update_ema(run.ema_model, run.model, settings.ema, progress["step"])
            progress["step"] += 1
            progress["batch"] += 1
            images_seen += batch[0].shape[0] * run.world_size
            bar.update()
            # processes stop together: they agree at the same steps, so a Ctrl-C waits for the next one
            ends = progress["batch"] % CHECK_EVERY == 0 or progress["batch"] == run.steps_per_epoch
            if ends or (stop_requested and run.world_size == 1):
                stop_votes = read_loss(run, loss_sum, bool(stop_requested), epoch)
                speed = images_seen / (time.perf_counter() - epoch_start)
                loss, lr = progress["loss_sum"] / progress["batch"], run.scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")
                if stop_votes:
                    bar.close()
                    save_interrupted_epoch(run, epoch)
                    return None
                # process 0's weights and buffers are those every process resumes with (DDP broadcasts them)
                if run.main_process and progress["batch"] < run.steps_per_epoch and run.save_due():
                    run.save_last()
    share_buffers([run.model, run.ema_model], run.world_size)
    seconds = time.perf_counter() - epoch_start
    row = {
        "epoch": epoch + 1,
        "step": progress["step"],
        "lr": run.scheduler.get_last_lr()[0],
        "train_loss": progress["loss_sum"] / run.steps_per_epoch,
        "epoch_seconds": round(seconds, 2),
        "images_per_second": round(images_seen / seconds, 2),
    }
    progress.update(epoch=epoch + 1, batch=0, loss_sum=0.0)
    return row


def save_interrupted_epoch(run: Run, epoch: int) -> None:
    """After a stop request inside an epoch: last.pt at the current step, and metrics.csv as it is."""
    share_buffers([run.model, run.ema_model], run.world_size)
    if run.main_process:
        run.save_last()
        where = f"epoch {epoch + 1}, batch {run.progress['batch']}"
        print(
            f"\nstopped: saved {run.run_weights / 'last.pt'} ({where}); continue with train.resume=auto",
            file=sys.stderr,
        )


def take_step(run: Run, batch: list[torch.Tensor]) -> torch.Tensor:
    """``step.train_step`` with the run's model; returns the loss on the device. If the first step of a
    compiled model fails, training goes on without torch.compile, with a notice."""
    settings = run.config.train
    arguments = (run.optimizer, batch, settings.loss, settings.grad_clip, run.device, settings.precision, run.scaler)
    options = {"accum_steps": settings.grad_accum_steps, "channels_last": settings.channels_last}
    try:
        loss = train_step(run.step_model, *arguments, **options)
    except Exception as error:  # compiling needs a C++ compiler (Triton on GPUs) and can fail in many ways
        if not run.compiling:
            raise
        note(f"torch.compile failed ({first_line(error)}): training without it")
        run.step_model = run.step_model._orig_mod
        loss = train_step(run.step_model, *arguments, **options)
    run.compiling = False
    return loss


def read_loss(run: Run, loss_sum: torch.Tensor, stop_requested: bool, epoch: int) -> float:
    """Read the epoch's loss sum on the host (summed over the processes with their stop votes, then
    averaged) into ``progress["loss_sum"]``; returns the number of stop votes. A loss that is not
    finite is a UserError, with the checkpoints left as they were."""
    votes = torch.tensor(float(stop_requested), device=run.device)
    loss_total, stop_votes = sum_over_processes(torch.stack((loss_sum, votes)), run.world_size).tolist()
    run.progress["loss_sum"] = loss_total / run.world_size
    if not math.isfinite(run.progress["loss_sum"]):
        where = f"in epoch {epoch + 1} (step {run.progress['step']})"
        cure = loss_cure(run.config.train, bf16_supported(run.device))
        raise UserError(
            f"the training loss became {run.progress['loss_sum']} {where}: {cure}; the checkpoints in "
            f"{run.run_weights} were left as they were"
        )
    return stop_votes


def validate(run: Run, epoch: int) -> dict[str, float]:
    """``validation.evaluate`` on the validation images; saves best.pt when ``train.best_metric`` improved."""
    keep = TENSORBOARD_IMAGES if run.writer is not None else 0
    scores = evaluate(run.predictor, run.data.val, run.config.train.loss, run.rank, run.world_size, keep)
    if not math.isfinite(scores["val_loss"]):
        raise UserError(
            f"the validation loss became {scores['val_loss']} in epoch {epoch + 1}: lower train.lr; "
            f"checkpoints left as they were in {run.run_weights}"
        )
    if scores.get("uniform_images") == len(run.data.val) and not run.warned_uniform:
        note(
            f"epoch {epoch + 1}: " + uniform_prediction_note(run.data.val.names, len(run.data.val), "validation images")
        )
        run.warned_uniform = True
    best_metric = run.config.train.best_metric
    if improved(scores[best_metric], run.progress["best_value"], best_metric):
        run.progress.update(best_value=scores[best_metric], best_epoch=epoch + 1)
        if run.main_process:
            save_checkpoint(run.run_weights / "best.pt", run.state())
    return scores


def finish(run: Run) -> None:
    """After the last epoch: say where the best checkpoint is, and calibrate ``predict.threshold: auto`` on it."""
    config, best = run.config, run.run_weights / "best.pt"
    metric = config.train.best_metric
    print(f"done: best {metric} {run.progress['best_value']:.4f} at epoch {run.progress['best_epoch']}; {best}")
    if config.predict.threshold != "auto" or config.unet.num_classes != 2:
        return
    model = build_model(config.unet).to(run.device)
    model.load_state_dict(read_checkpoint(best)["model"])
    predictor = Predictor.from_settings(model, config.predict, config.augment, config.train.image_scale)
    print(calibrate_checkpoint(best, predictor, run.data.val, metric))


def run_config(config: Config) -> int:
    """Train as ``config`` says, or run the check of ``segmentation.engine.search`` that
    ``overfit_one_batch`` switches on (with ``full_train``, the search's best config is then trained);
    returns the exit code."""
    train_settings, restarted = continued_after_restart(config.train)
    if restarted:
        note(restarted)
        config = dataclasses.replace(config, train=train_settings)
    settings, text = config.overfit_one_batch, config_to_yaml(config)
    if settings.mode == "lr_find":
        search.lr_find(config.unet, config.train, config.augment, settings, text)
        return 0
    if settings.mode == "overfit":
        return 0 if search.overfit_batch(config.unet, config.train, settings, text)["reached"] else 1
    if settings.mode == "hp_search":
        summary = search.hp_search(config)
        if "full_train_config" not in summary:
            return 130 if summary["interrupted"] else 0
        config = summary["full_train_config"]
    if config.train.folds and config.train.fold == "all":
        return train_every_fold(config)
    return 130 if train(config)["interrupted"] else 0


def train_every_fold(config: Config) -> int:
    """``train.fold: all``: train fold 0, 1, ... of ``train.folds`` in turn, each a run named
    ``<base>-fold<i>``, then print the test.py command that scores them all. With ``train.resume: auto``
    the newest series (or the one ``train.run_name`` names) continues: finished folds (all epochs, or
    ended by early stopping) are skipped and an interrupted one resumes from its ``last.pt``."""
    settings = config.train
    save_path, resume = Path(settings.save_path), settings.resume == "auto"
    base = settings.run_name or (newest_fold_series(save_path) if resume else None) or run_base_name(settings)
    best_checkpoints = []
    for fold in range(settings.folds):
        fold_train = dataclasses.replace(settings, fold=fold, run_name=base, resume=None)
        last = save_path / f"{base}-fold{fold}" / "last.pt"
        if resume and last.is_file():
            ended = finished(read_checkpoint(last)["progress"], settings.max_epochs, settings.early_stopping)
            if ended:
                note(f"fold {fold}: {last} {ended}; skipping it")
                best_checkpoints.append(last.with_name("best.pt"))
                continue
            fold_train = dataclasses.replace(fold_train, resume=str(last))
        note(f"fold {fold} of {settings.folds} (0..{settings.folds - 1}) held out for testing")
        summary = train(dataclasses.replace(config, train=fold_train))
        if summary["interrupted"]:
            print(
                f"continue the folds with: python training.py ... train.fold=all train.run_name={base} "
                "train.resume=auto"
            )
            return 130
        best_checkpoints.append(summary["run_weights"] / "best.pt")
    print(f"all {settings.folds} folds trained; score each on its test images, with the mean and standard deviation:")
    print("python test.py --checkpoint " + " ".join(map(str, best_checkpoints)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train a U-Net from a YAML config.",
        epilog=(
            "overrides: section.key=value, values read as YAML, e.g. train.lr=3e-4 unet.input_channels=[16,32,64,128]"
        ),
    )
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help="YAML config (default: config.yaml beside this script)"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        notices: list[str] = []
        config = load_config(args.config, args.overrides, notices)
        for message in notices:
            note(message)
        return run_config(config)
    except KeyboardInterrupt:
        print("\nstopped at once, without saving: the checkpoints keep their last saved state", file=sys.stderr)
        return 130
    except (UserError, OSError) as error:  # OSError: a full disk, a file that cannot be written
        return report_error(error)


if __name__ == "__main__":
    sys.exit(main())
