"""Train a U-Net (Ronneberger et al. 2015) from a YAML config: the command line and the training loop.

    python training.py [--config config.yaml] [section.key=value ...]

for example ``python training.py train.lr=3e-4 unet.input_channels=[16,32,64,128]``. Each run writes
its resolved config, its plan (``plan.json``: what it decided from the data), ``metrics.csv``,
``curves.png`` and a weight-map figure to ``log_path/<run>/`` and its checkpoints ``last.pt`` and
``best.pt`` to ``save_path/<run>/``. ``train.resume=auto`` continues the newest run exactly where it
stopped; Ctrl-C saves ``last.pt`` first. ``overfit_one_batch.overfit=true``, ``hp_search=true`` or
``lr_find=true`` run a check of ``segmentation.engine.search`` instead of training (an overfit that
misses its tolerance exits with code 1). Under ``torchrun --nproc_per_node=N`` every process trains its
shard of the tiles (DistributedDataParallel) and process 0 alone prints, logs and saves.

The loop (``train_process``) reads as its phases: set up, then for each epoch train, validate, log
and save. The config is read once (``segmentation.config``), the run's plan decided once from the data
(``segmentation.plan``), and each library function gets the section or the values it needs: the data
from ``dataset.py``, the run's state from ``segmentation.engine.run``, the step from
``segmentation.engine.step``, checkpoints from ``segmentation.engine.resume``, validation from
``segmentation.engine.validation``, run folders and figures from ``segmentation.runs``, the processes
from ``segmentation.engine.distributed``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dataset import count_steps
from segmentation.checkpoints import Progress, save_checkpoint
from segmentation.config import DEFAULT_CONFIG, Config, UserError, config_to_yaml, load_config
from segmentation.console import first_line, note, report_error
from segmentation.data.augment import augment_on_device
from segmentation.device import bf16_supported, out_of_memory_advice, prepare_device
from segmentation.engine import search
from segmentation.engine.budget import TimeBudget, clock
from segmentation.engine.distributed import (
    from_rank_zero,
    lost_process,
    process_group,
    share_buffers,
    sum_over_processes,
)
from segmentation.engine.folds import train_every_fold
from segmentation.engine.restarts import continued_after_restart, publish_run
from segmentation.engine.resume import find_resume_checkpoint, load_checkpoint, read_initial_weights, restore
from segmentation.engine.run import (
    Models,
    Processes,
    Run,
    RunFolders,
    TrainResult,
    build_loading,
    build_models,
    build_optimisation,
    check_training_memory,
    plan_and_data,
    run_claimed,
    start_logs,
    stepping_model,
    write_run_plan,
)
from segmentation.engine.signals import stop_requests
from segmentation.engine.step import fit_schedule, loss_cure, train_step, update_ema
from segmentation.engine.validation import Validation, calibrate_checkpoint, evaluate, improved
from segmentation.inference.infer import Predictor, uniform_prediction_note
from segmentation.inference.trained import load_trained
from segmentation.options import OneLineParser
from segmentation.plan import training_tile_size
from segmentation.runs.figures import plot_curves
from segmentation.runs.folders import epoch_line, new_run_name, read_metrics, write_metrics
from segmentation.runs.tensorboard import require_tensorboard, write_epoch

CHECK_EVERY = 10  # steps between reading the loss on the host (a device sync) for the bar and the NaN check
TENSORBOARD_IMAGES = 3  # validation images shown with truth and prediction in TensorBoard at each validation


def train(config: Config) -> TrainResult:
    """Train as the config says, in this process or, under torchrun, in each of its processes."""
    with process_group(config.train.device) as (rank, world_size, device):
        try:
            return train_process(config, Processes(rank, world_size, device))
        except torch.OutOfMemoryError:
            tile_size = training_tile_size(config.data.tile_size, config.unet.depth, config.unet.padding)
            advice = out_of_memory_advice(device, config.train, tile_size)
            intact = "; the checkpoints saved so far are intact (continue with train.resume=auto)"
            raise UserError(advice + intact) from None
        except RuntimeError as error:  # gloo and NCCL report a process that is gone as a RuntimeError
            lost = lost_process(error, rank, world_size)
            if lost is None:
                raise
            raise lost from None


def train_process(config: Config, processes: Processes) -> TrainResult:
    """``train`` in one of the processes: all of them train, process 0 alone prints, logs, saves and holds the
    run's lock (released when training ends, also on an error or Ctrl-C)."""
    run = set_up(config, processes)
    with run.lock or contextlib.nullcontext():
        return train_epochs(run)


def train_epochs(run: Run) -> TrainResult:
    """The epochs of a set-up run, from where its progress stands, then (process 0) ``finish``."""
    config, processes = run.config, run.processes
    patience = config.run.early_stopping
    validation = None
    run.models.model.train()
    with stop_requests() as stop_requested, run.writer or contextlib.nullcontext():
        first_epoch = run.progress.epoch
        for epoch in range(first_epoch, config.train.max_epochs):
            if run.time_up():  # train.max_minutes spent: a resumed run's, or the planned last epoch ran long
                if epoch == first_epoch:
                    note(f"the run has used its train.max_minutes ({config.run.max_minutes:g}): raise it to go on")
                break
            # train: one pass over the tiles (under train.max_minutes: up to the budget's end); a stop request
            # ends it after a whole step, last.pt saved
            epoch_start = clock()
            row = train_epoch(run, epoch, stop_requested)
            if row is None:
                return run.result(True, validation)
            # validate: whole images, predicted as test.py predicts them; a better score saves best.pt
            last_epoch = epoch + 1 == run.fit_to_budget(epoch, clock() - epoch_start)
            stop, examples = False, []
            if (epoch + 1) % config.run.eval_epoch == 0 or last_epoch:
                validation = validate(run, epoch)
                examples = validation.examples
                row.update(validation.row())
                stop = patience > 0 and epoch + 1 - run.progress.best_epoch >= patience
            run.progress.stopped_early = stop  # in last.pt: train.fold=all skips such a run as finished
            # log: metrics.csv before last.pt, so that a run killed between the two resumes with every row
            run.rows.append(row)
            due = last_epoch or stop or bool(stop_requested)
            log_epoch(run, row, examples, due)
            # save
            if run.processes.main and ((epoch + 1) % config.run.save_epoch == 0 or due or run.save_due()):
                run.save_last()
            run.budget.epoch_seconds.append(clock() - epoch_start)
            if stop_requested and processes.world_size == 1:
                saved = f"saved {run.folders.weights / 'last.pt'} after epoch {epoch + 1}"
                print(f"stopped: {saved}; continue with train.resume=auto", file=sys.stderr)
                return run.result(True, validation)
            if last_epoch:
                break
            if stop:
                if run.processes.main:
                    best = run.progress.best_epoch
                    print(f"early stopping: no better {config.run.best_metric} for {patience} epochs (best at {best})")
                break
    if run.processes.main:
        finish(run)
    return run.result(False, validation)


def set_up(config: Config, processes: Processes) -> Run:
    """Everything a training process needs, in an order that makes a run reproducible from its seed: the
    memory a step needs checked, the checkpoint to resume, the data and the plan, the model, optimizer and
    schedule, the run folders (a new run's name claimed, the run locked by process 0), the loader."""
    rank, world_size, device = processes.rank, processes.world_size, processes.device
    started = clock()  # train.max_minutes count from here
    check_training_memory(config, device)  # before anything is read, written or allocated
    resume_path = from_rank_zero(find_resume_checkpoint(config.run.resume, Path(config.run.save_path)), world_size)
    checkpoint = load_checkpoint(resume_path, config.unet, config.data, config.train.seed) if resume_path else None
    init_from = Path(config.run.init_from) if config.run.init_from and not checkpoint else None
    # train.init_from applies to a new run; read and checked before anything is written
    initial = read_initial_weights(init_from, config.unet) if init_from else None
    if config.run.tensorboard:
        require_tensorboard()  # a missing package stops the run before anything is written
    prepare_device(device, config.train.precision)
    if checkpoint:
        name = Progress.from_dict(checkpoint["progress"], resume_path).run_name
    else:  # a new run's name is claimed by process 0, which creates its folders
        fold = config.data.fold if config.data.folds else None
        claimed = new_run_name(config.run, config.data.dataset_name, fold) if rank == 0 else None
        name = from_rank_zero(claimed, world_size)
    folders = RunFolders.of(config.run, name)
    # process 0 holds the run's lock from here; a failure before the run is set up leaves no half-made new run
    with run_claimed(folders, name, rank == 0, new=checkpoint is None) as lock:
        torch.manual_seed(config.train.seed)
        plan, data = plan_and_data(config, processes, checkpoint, resume_path)
        check_training_memory(config, device, plan)  # a volume's tile is its data's: checked from here
        tiles_per_step = config.train.batch_size * config.train.grad_accum_steps
        steps_per_epoch = count_steps(len(data.train), tiles_per_step, world_size)
        model, ema_model, loaded = build_models(config.unet, plan, config.train, device, initial, init_from)
        if loaded:
            note(loaded)
        optimisation = build_optimisation(model, config.train, device, steps_per_epoch)
        if checkpoint:
            optimizer, scheduler, scaler = optimisation.optimizer, optimisation.scheduler, optimisation.scaler
            progress = restore(checkpoint, model, optimizer, scheduler, scaler, device, ema_model, resume_path)
            if progress.planned_epochs and config.run.max_minutes:  # the schedule the budget fitted last
                fit_schedule(scheduler, config.train, steps_per_epoch, progress.planned_epochs)
            progress.planned_epochs = progress.planned_epochs if config.run.max_minutes else 0
        else:
            progress = Progress(run_name=name)
        writer = start_logs(config, plan, folders, progress, data, device, bool(checkpoint)) if rank == 0 else None
        predict_model = model if ema_model is None else ema_model
        predictor = Predictor.from_plan(predict_model, plan, config.predict, config.augment, config.data.image_scale)
        loading = build_loading(data.train, config.train, steps_per_epoch, processes)
        step_model = stepping_model(model, config.train.compile, world_size, device)
        models = Models(model, ema_model, step_model, compiling=config.train.compile)
        rows = read_metrics(folders.log / "metrics.csv", progress.epoch)
        parts = (data, models, predictor, optimisation, loading, progress, folders, rows, writer, lock)
        run = Run(config, plan, processes, *parts, budget=TimeBudget(config.run.max_minutes, progress.seconds, started))
        if rank == 0:
            print("\n".join(run.start_lines(resume_path if checkpoint else None)), flush=True)
            if not checkpoint:
                run.save_last()  # from its first step a run has a last.pt: a kill resumes it, not an older run
            publish_run(folders.weights)
    return run


def train_epoch(run: Run, epoch: int, stop_requested: list) -> dict | None:
    """One pass over the training tiles, from the batch where a resumed epoch stopped; returns the
    epoch's metrics row, or None when a stop request ended the epoch early (last.pt saved)."""
    settings, progress, processes = run.config.train, run.progress, run.processes
    steps, scheduler = run.loading.steps_per_epoch, run.optimisation.scheduler
    run.loading.sampler.set_epoch(epoch, start=progress.batch * settings.batch_size * settings.grad_accum_steps)
    epoch_start, images_seen = time.perf_counter(), 0
    loss_sum = torch.tensor(progress.loss_sum, device=processes.device)
    bar = tqdm(
        total=steps,
        initial=progress.batch,
        desc=f"epoch {epoch + 1}/{run.epochs}",
        unit="step",
        dynamic_ncols=True,
        leave=False,
        disable=not processes.main,
    )
    # a with block closes the bar on every way out, so that an error's one line starts a line of its own
    with bar:
        for batch in run.loading.loader:
            augment, seed, plan = run.config.augment, settings.seed, run.plan
            batch = augment_on_device(
                batch, augment, seed, progress.step, *processes.placement, plan.sparse, plan.spacing
            )
            loss_sum += take_step(run, batch)
            scheduler.step()
            if run.models.ema_model is not None:
                update_ema(run.models.ema_model, run.models.model, settings.ema, progress.step)
            progress.step += 1
            progress.batch += 1
            images_seen += batch[0].shape[0] * processes.world_size
            bar.update()
            # processes stop together: they agree at the same steps, so a Ctrl-C waits for the next one
            ends = progress.batch % CHECK_EVERY == 0 or progress.batch == steps
            time_up = progress.batch < steps and run.time_up()  # train.max_minutes: checked at every step
            if ends or time_up or (stop_requested and processes.world_size == 1):
                stop_votes = read_loss(run, loss_sum, bool(stop_requested), epoch)
                speed = images_seen / (time.perf_counter() - epoch_start)
                loss, lr = progress.loss_sum / progress.batch, scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")
                if stop_votes:
                    bar.close()
                    save_interrupted_epoch(run, epoch)
                    return None
                if time_up:
                    break  # this epoch, validated, is the run's last
                # process 0's weights and buffers are those every process resumes with (DDP broadcasts them)
                if processes.main and progress.batch < steps and run.save_due():
                    run.save_last()
    share_buffers([run.models.model, run.models.ema_model], processes.world_size)
    seconds = time.perf_counter() - epoch_start
    row = {
        "epoch": epoch + 1,
        "step": progress.step,
        "lr": scheduler.get_last_lr()[0],
        "train_loss": progress.loss_sum / progress.batch,
        "epoch_seconds": round(seconds, 2),
        "images_per_second": round(images_seen / seconds, 2),
    }
    progress.epoch, progress.batch, progress.loss_sum = epoch + 1, 0, 0.0
    return row


def save_interrupted_epoch(run: Run, epoch: int) -> None:
    """After a stop request inside an epoch: last.pt at the current step, and metrics.csv as it is."""
    share_buffers([run.models.model, run.models.ema_model], run.processes.world_size)
    if run.processes.main:
        run.save_last()
        where = f"epoch {epoch + 1}, batch {run.progress.batch}"
        print(
            f"\nstopped: saved {run.folders.weights / 'last.pt'} ({where}); continue with train.resume=auto",
            file=sys.stderr,
        )


def take_step(run: Run, batch: list[torch.Tensor]) -> torch.Tensor:
    """``step.train_step`` with the run's model; returns the loss on the device. If the first step of a
    compiled model fails, training goes on without torch.compile, with a notice."""
    settings, models, optimisation = run.config.train, run.models, run.optimisation
    device, scaler = run.processes.device, optimisation.scaler
    arguments = (optimisation.optimizer, batch, settings.loss, settings.grad_clip, device, settings.precision, scaler)
    options = {"accum_steps": settings.grad_accum_steps, "channels_last": settings.channels_last}
    try:
        loss = train_step(models.step_model, *arguments, **options)
    except Exception as error:  # compiling needs a C++ compiler (Triton on GPUs) and can fail in many ways
        if not models.compiling:
            raise
        note(f"torch.compile failed ({first_line(error)}): training without it")
        models.step_model = models.step_model._orig_mod
        loss = train_step(models.step_model, *arguments, **options)
    models.compiling = False
    return loss


def read_loss(run: Run, loss_sum: torch.Tensor, stop_requested: bool, epoch: int) -> float:
    """Read the epoch's loss sum on the host (summed over the processes with their stop votes, then
    averaged) into ``progress.loss_sum``; returns the number of stop votes. A loss that is not finite is
    a UserError, with the checkpoints left as they were."""
    processes, progress = run.processes, run.progress
    votes = torch.tensor(float(stop_requested), device=processes.device)
    loss_total, stop_votes = sum_over_processes(torch.stack((loss_sum, votes)), processes.world_size).tolist()
    progress.loss_sum = loss_total / processes.world_size
    if not math.isfinite(progress.loss_sum):
        where = f"in epoch {epoch + 1} (step {progress.step})"
        cure = loss_cure(run.config.train, bf16_supported(processes.device))
        raise UserError(
            f"the training loss became {progress.loss_sum} {where}: {cure}; the checkpoints in "
            f"{run.folders.weights} were left as they were"
        )
    return stop_votes


def validate(run: Run, epoch: int) -> Validation:
    """``validation.evaluate`` on the validation images; saves best.pt when ``train.best_metric`` improved."""
    keep = TENSORBOARD_IMAGES if run.writer is not None else 0
    processes, loss = run.processes, run.config.train.loss
    validation = evaluate(run.predictor, run.data.val, loss, processes.rank, processes.world_size, keep)
    if not math.isfinite(validation.loss):
        raise UserError(
            f"the validation loss became {validation.loss} in epoch {epoch + 1}: lower train.lr; "
            f"checkpoints left as they were in {run.folders.weights}"
        )
    if validation.uniform_images == len(run.data.val) and not run.warned_uniform:
        names = run.data.val.names
        note(f"epoch {epoch + 1}: " + uniform_prediction_note(names, len(run.data.val), "validation images"))
        run.warned_uniform = True
    best_metric = run.config.run.best_metric
    if improved(validation.value(best_metric), run.progress.best_value, best_metric):
        run.progress.best_value, run.progress.best_epoch = validation.value(best_metric), epoch + 1
        if processes.main:
            save_checkpoint(run.folders.weights / "best.pt", run.state())
    return validation


def log_epoch(run: Run, row: dict, examples: list, due: bool) -> None:
    """In process 0: the epoch's line; metrics.csv and curves.png every ``train.log_epoch`` epochs and when
    the run ends; TensorBoard's events."""
    if not run.processes.main:
        return
    tqdm.write(epoch_line(row, run.epochs))
    if row["epoch"] % run.config.run.log_epoch == 0 or due:
        write_metrics(run.folders.log / "metrics.csv", run.rows)
        plot_curves(run.rows, run.folders.log / "curves.png")
    if run.writer is not None:
        write_epoch(run.writer, row, examples)


def finish(run: Run) -> None:
    """After the last epoch: say where the best checkpoint is, and calibrate ``predict.threshold: auto`` on it
    (the calibrated plan goes into best.pt and plan.json)."""
    best, metric = run.folders.weights / "best.pt", run.config.run.best_metric
    print(f"done: best {metric} {run.progress.best_value:.4f} at epoch {run.progress.best_epoch}; {best}")
    if run.config.predict.threshold != "auto" or run.plan.num_classes != 2:
        return
    trained = load_trained(best, device=run.processes.device, calibrating=True, current=run.config)
    plan, line = calibrate_checkpoint(best, trained.plan, trained.predictor, run.data.val, metric)
    write_run_plan(run.folders.log / "plan.json", plan)
    print(line)


def run_config(config: Config) -> int:
    """Train as ``config`` says, or run the check of ``segmentation.engine.search`` that
    ``overfit_one_batch`` switches on (with ``full_train``, the search's best config is then trained);
    returns the exit code."""
    every_fold = bool(config.data.folds) and config.data.fold == "all"
    run_settings, restarted = continued_after_restart(config.run, every_fold)
    if restarted:
        note(restarted)
        config = dataclasses.replace(config, run=run_settings)
    settings, text = config.overfit_one_batch, config_to_yaml(config)
    if settings.mode == "lr_find":
        search.lr_find(config, text)
        return 0
    if settings.mode == "overfit":
        return 0 if search.overfit_batch(config, text)["reached"] else 1
    if settings.mode == "hp_search":
        summary = search.hp_search(config)
        if "full_train_config" not in summary:
            return 130 if summary["interrupted"] else 0
        config = summary["full_train_config"]
    if every_fold:
        return train_every_fold(config, train)
    return 130 if train(config).interrupted else 0


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
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
