"""A training process's state: its place among the processes, models, optimisation, loading, progress and folders.

training.py's ``set_up`` builds a ``Run`` from these parts and its loop works on it. Each part is small and
named: ``Processes`` (rank, world size, device), ``Models`` (the network, its moving average and the
wrapped model that takes the steps), ``Optimisation`` (optimizer, schedule, loss scaler), ``Loading``
(sampler, loader, steps per epoch) and ``RunFolders`` (logs, checkpoints). ``Run.state`` is what a
checkpoint holds; ``TrainResult`` is what training returns. Before any of it is built,
``check_training_memory`` refuses a step that cannot fit the device; ``run_claimed`` holds the run's lock
and leaves no half-made run behind a set-up that fails.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from dataset import DataSets, EpochSampler, build_datasets, prepare_data
from model import build_model, count_parameters
from segmentation.checkpoints import Progress, save_checkpoint, stored_boundary
from segmentation.config import Config, UserError, config_to_yaml
from segmentation.console import note
from segmentation.device import require_memory
from segmentation.engine.budget import TimeBudget
from segmentation.engine.distributed import from_rank_zero
from segmentation.engine.lock import RunLock, take_run_lock
from segmentation.engine.resume import load_initial_weights, training_state
from segmentation.engine.step import build_optimizer, build_scheduler, fit_schedule
from segmentation.engine.validation import Validation
from segmentation.files import write_atomically
from segmentation.inference.infer import Predictor
from segmentation.memory import forward_maps, shown_tile, training_activation_bytes, unet_parameter_count
from segmentation.plan import Plan, decide_plan, ignore_problem, reading_problem, training_tile_size, write_plan
from segmentation.runs.figures import save_check_figures
from segmentation.runs.folders import start_run_folders, write_metrics
from segmentation.runs.tensorboard import open_writer, write_settings
from segmentation.settings import RunSettings, TrainSettings, UNetSettings


@dataclass(frozen=True)
class Processes:
    """This process's ``rank`` among ``world_size`` training processes (1 without torchrun) and its ``device``."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Process 0, which alone prints, logs and saves."""
        return self.rank == 0

    @property
    def placement(self) -> tuple[torch.device, int, int]:
        """``(device, rank, world_size)``, as the augmentation takes them."""
        return self.device, self.rank, self.world_size


@dataclass
class Models:
    """``model``, the bare network; ``ema_model``, the moving average of its weights under ``train.ema`` (else
    None); ``step_model``, the same network wrapped by DistributedDataParallel and torch.compile where those
    are on, which takes the steps; ``compiling``: until the first step of a torch.compile'd model has run."""

    model: torch.nn.Module
    ema_model: torch.nn.Module | None
    step_model: torch.nn.Module
    compiling: bool = False

    @property
    def predict_model(self) -> torch.nn.Module:
        """What validation and best.pt use: the moving average where there is one."""
        return self.model if self.ema_model is None else self.ema_model


@dataclass
class Optimisation:
    """The ``optimizer``, its learning-rate ``scheduler`` and the fp16 loss ``scaler`` (None otherwise)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None


@dataclass
class Loading:
    """The ``sampler`` and ``loader`` of the training tiles and the optimisation steps per epoch."""

    sampler: EpochSampler
    loader: DataLoader
    steps_per_epoch: int


@dataclass(frozen=True)
class RunFolders:
    """A run's folders: ``log`` (``log_path/<run>``) and ``weights`` (``save_path/<run>``)."""

    log: Path
    weights: Path

    @classmethod
    def of(cls, run: RunSettings, name: str) -> RunFolders:
        return cls(Path(run.log_path) / name, Path(run.save_path) / name)


@dataclass
class Run:
    """What one training process works with, as training.py's ``set_up`` builds it: the resolved ``config``
    and the run's ``plan``, its place among the ``processes``, the ``data``, the ``models`` and the
    ``predictor`` that validates (on ``models.predict_model``), the ``optimisation``, the tile ``loading``,
    the ``progress`` (in every checkpoint), its ``folders``, the metrics.csv ``rows`` so far and, in
    process 0, the run's ``lock`` and under ``train.tensorboard`` the event ``writer``."""

    config: Config
    plan: Plan
    processes: Processes
    data: DataSets
    models: Models
    predictor: Predictor
    optimisation: Optimisation
    loading: Loading
    progress: Progress
    folders: RunFolders
    rows: list[dict]
    writer: object | None = None
    lock: RunLock | None = None  # process 0's, released when training ends
    budget: TimeBudget = field(default_factory=lambda: TimeBudget(0.0))  # train.max_minutes
    warned_uniform: bool = False  # the note on predictions of a single class is given once
    last_saved: float = field(default_factory=time.monotonic)  # when last.pt was written

    def state(self) -> dict:
        """The run as it stands, as a checkpoint (its progress's ``seconds`` brought up to date)."""
        optimisation, models = self.optimisation, self.models
        self.progress.seconds = round(self.budget.used(), 2)
        return training_state(
            models.model,
            optimisation.optimizer,
            optimisation.scheduler,
            optimisation.scaler,
            self.config.to_dict(),
            self.plan,
            self.progress,
            self.processes.device,
            models.ema_model,
        )

    def save_last(self) -> None:
        """metrics.csv, then last.pt at the current step (process 0): a run killed after this resumes
        here with every row."""
        write_metrics(self.folders.log / "metrics.csv", self.rows)
        save_checkpoint(self.folders.weights / "last.pt", self.state())
        self.last_saved = time.monotonic()

    def save_due(self) -> bool:
        """Whether ``train.save_minutes`` have passed since last.pt was written."""
        minutes = self.config.run.save_minutes
        return minutes > 0 and time.monotonic() - self.last_saved >= 60 * minutes

    @property
    def epochs(self) -> int:
        """The epochs the run will have trained when it ends: a time budget's latest plan, else
        ``train.max_epochs``."""
        return self.progress.planned_epochs or self.config.train.max_epochs

    def fit_to_budget(self, epoch: int, seconds_into_epoch: float) -> int:
        """Under ``train.max_minutes``, during epoch ``epoch`` (from 0): plan the epochs that fit the time
        left (process 0's plan, in every process), fit the learning-rate schedule to them and return them;
        without a budget ``train.max_epochs``."""
        if not self.budget.limited:
            return self.config.train.max_epochs
        planned = self.budget.planned_epochs(epoch, self.config.train.max_epochs, seconds_into_epoch)
        planned = from_rank_zero(planned, self.processes.world_size)
        if planned != self.progress.planned_epochs:
            fit_schedule(self.optimisation.scheduler, self.config.train, self.loading.steps_per_epoch, planned)
            self.progress.planned_epochs = planned
        return planned

    def time_up(self) -> bool:
        """Whether ``train.max_minutes`` are spent (process 0's clock, in every process; never without one)."""
        return self.budget.limited and from_rank_zero(self.budget.over(), self.processes.world_size)

    def start_lines(self, resumed_from: Path | None) -> list[str]:
        """The run's first lines: model, device, precision, tiles and steps per epoch, where it writes."""
        settings, world_size = self.config.train, self.processes.world_size
        batch_size, accum_steps = settings.batch_size, settings.grad_accum_steps
        step_batch = batch_size * accum_steps * world_size
        split = (
            f" = {batch_size} x {accum_steps} accumulated x {world_size} processes" if step_batch != batch_size else ""
        )
        processes = f" in each of {world_size} processes" if world_size > 1 else ""
        progress, folders = self.progress, self.folders
        tile = shown_tile(self.plan.tile_shape) if self.plan.dims == 3 else self.plan.tile_size
        lines = [
            f"U-Net {count_parameters(self.models.model):,} parameters on {self.processes.device}{processes}, "
            f"{settings.precision}; {len(self.data.train)} tiles of {tile} px per epoch "
            f"({self.loading.steps_per_epoch} steps of {step_batch}{split}), {len(self.data.val)} validation images",
            f"run {progress.run_name}: logs in {folders.log}, checkpoints in {folders.weights}",
        ]
        if self.budget.limited:
            lines.append(
                f"time budget {self.budget.minutes:g} min (train.max_minutes), {self.budget.used() / 60:.1f} used: "
                f"epochs planned from their timing, {settings.max_epochs} at most, the schedule fitted to them"
            )
        if resumed_from:
            lines.append(f"resuming {resumed_from} at epoch {progress.epoch + 1}, batch {progress.batch}")
        return lines

    def result(self, interrupted: bool, validation: Validation | None) -> TrainResult:
        """What training returns, as the run stands."""
        return TrainResult(interrupted, self.models.predict_model, self.folders, self.progress, validation)


@dataclass
class TrainResult:
    """What ``train`` returns: whether a stop request ``interrupted`` it, the trained ``model`` (the moving
    average where there is one), the run's ``folders``, its ``progress`` (epochs, steps, the best value
    of ``train.best_metric`` and its epoch) and the last ``validation`` (None before the first)."""

    interrupted: bool
    model: torch.nn.Module
    folders: RunFolders
    progress: Progress
    validation: Validation | None


def start_logs(
    config: Config,
    plan: Plan,
    folders: RunFolders,
    progress: Progress,
    data: DataSets,
    device: torch.device,
    resumed: bool,
):
    """In process 0: the run's folders and its settings and plan in them; for a new run the figures to check
    by eye; with ``train.tensorboard`` the event writer (the settings as hparams for a new run). Returns
    the writer, or None."""
    start_run_folders(folders.log, folders.weights, config_to_yaml(config), progress.epoch if resumed else None)
    write_run_plan(folders.log / "plan.json", plan)
    writer = open_writer(folders.log, progress.epoch) if config.run.tensorboard else None
    if not resumed:
        save_check_figures(
            folders.log, data.example, data.train, config.augment, config.train.seed, device, plan.spacing
        )
        if writer is not None:
            write_settings(writer, config.to_dict())
    return writer


def write_run_plan(path: Path, plan: Plan) -> None:
    """``plan.write_plan`` through a temporary file and a rename: whole or not at all, a full disk one line."""
    write_atomically(path, lambda temporary: write_plan(temporary, plan), len(str(plan.to_dict())), "train.log_path")


@contextlib.contextmanager
def run_claimed(folders: RunFolders, name: str, main: bool, new: bool) -> Iterator[RunLock | None]:
    """In process 0 (``main``), run ``name``'s lock (``lock.take_run_lock``) for the rest of the set-up; where
    the set-up fails, the lock is released and a ``new`` run's folders (claimed by ``new_run_name``, this
    process's alone) are removed, so that a refusal leaves no half-made run. On success the lock stays held:
    the run releases it when training ends."""
    if not main:
        yield None
        return
    lock = None
    try:
        folders.weights.mkdir(parents=True, exist_ok=True)  # a run resumed from a checkpoint kept elsewhere
        lock = take_run_lock(folders.weights, name)
        yield lock
    except BaseException:
        if lock is not None:
            lock.release()
        for folder in (folders.log, folders.weights):
            if new:
                shutil.rmtree(folder, ignore_errors=True)
            else:  # a resumed run keeps its folders, but for one this set-up made and left empty
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise


def check_training_memory(config: Config, device: torch.device, plan: Plan | None = None) -> None:
    """A UserError (one line) where a training step of ``config`` would not fit the memory that ``device`` has
    free, before anything is written or allocated: the parameters with their gradients, optimizer state and
    moving average, and the activations of ``train.batch_size`` tiles (``memory.forward_maps``; an upper-ish
    estimate). On a CPU the processes that torchrun starts on this machine share the memory. A 3D run's tile
    and geometry come from its data's spacing: it is checked once its ``plan`` is decided (before the network
    is built); without a plan it passes."""
    unet, train, data = config.unet, config.train, config.data
    geometry: tuple = (None, None)
    if unet.dims == 3 and plan is None:
        return
    if plan is not None and plan.dims == 3:
        tile, geometry = plan.tile_shape, (plan.kernel_sizes, plan.pool_sizes)
    else:
        tile = training_tile_size(data.tile_size, unet.depth, unet.padding)
    classes = unet.num_classes + (unet.boundary_class is not False)  # auto may add the border class
    blocks = forward_maps(unet, classes, tile, 4 if train.precision == "fp32" else 2, *geometry)
    # the weights, their gradients, the optimizer's state (Adam: two moments, and a step's temporaries), the average
    copies = 2 + (2 if train.optim == "sgd" else 3) + (train.ema > 0)
    batch = train.batch_size
    activations = batch * training_activation_bytes(blocks, train.activation_checkpointing)
    parts = {
        "parameters, gradients and optimizer state": 4 * copies * unet_parameter_count(unet, classes, *geometry),
        f"activations of {batch} tiles of {shown_tile(tile)} px": activations,
    }
    switch = "" if train.activation_checkpointing else ", or set train.activation_checkpointing=true"
    sides = tile if isinstance(tile, int) else shown_tile(tile)
    advice = (
        f"lower train.batch_size ({batch}), train.tile_size ({sides}) or unet.input_channels "
        f"({list(unet.input_channels)}){switch}"
    )
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    require_memory("a training step", parts, device, advice, sharing)


def plan_and_data(
    config: Config, processes: Processes, checkpoint: dict | None, resume_path: Path | None
) -> tuple[Plan, DataSets]:
    """``(plan, datasets)``: the configured images prepared, the run's plan (decided from them for a new run,
    the checkpoint's for a resumed one, whose masks must read as they did) and the datasets it cuts."""
    unet, data = config.unet, config.data
    prepared = prepare_data(
        data,
        unet.image_channels,
        unet.num_classes,
        config.train.seed,
        note,
        processes.rank,
        processes.world_size,
        unet.dims,
    )
    if checkpoint is not None and "plan" in checkpoint:
        plan = Plan.from_dict(checkpoint["plan"], str(resume_path))
        problem = ignore_problem(plan, config.data) or reading_problem(plan, prepared.train)
        if problem:
            raise UserError(f"{resume_path}: {problem}, or start a new run")
    else:  # a new run, or one from before plans, which decided it again at every start
        plan = decide_plan(unet, data, config.predict, prepared.train, note)
        if checkpoint is not None and plan.boundary_class != stored_boundary(checkpoint, resume_path):
            raise UserError(
                f"{resume_path} holds another architecture (unet.boundary_class: checkpoint "
                f"{not plan.boundary_class}, masks now {plan.boundary_class}): set unet.boundary_class as in the "
                "checkpoint, or start a new run"
            )
    return plan, build_datasets(prepared, plan, data.samples_per_image, config.train.seed, note)


def build_models(
    unet: UNetSettings,
    plan: Plan,
    train: TrainSettings,
    device: torch.device,
    initial: dict | None = None,
    init_from: Path | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module | None, str | None]:
    """``(model, moving average or None, note)``: the network as ``unet`` and the ``plan`` describe it,
    started from the weights of the ``initial`` checkpoint read from ``init_from`` where there is one
    (``train.init_from``; the note says what was loaded), laid out and checkpointed as ``train`` says, and
    its moving average under ``train.ema``."""
    model = build_model(unet, plan.boundary_class, plan.kernel_sizes, plan.pool_sizes)
    message = load_initial_weights(model, initial, init_from) if initial is not None else None
    model = model.to(device)
    model.activation_checkpointing = train.activation_checkpointing
    if train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # a copy, not a new model: the same initial weights, and no draw from the seeded random stream
    ema_model = copy.deepcopy(model).requires_grad_(False) if train.ema > 0 else None
    return model, ema_model, message


def stepping_model(model: torch.nn.Module, compile: bool, world_size: int, device: torch.device) -> torch.nn.Module:
    """The model that takes the steps: wrapped by DistributedDataParallel (which all-reduces the gradients
    during the backward pass) in several processes, and by torch.compile under ``train.compile``."""
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if compile else model


def build_optimisation(
    model: torch.nn.Module, train: TrainSettings, device: torch.device, steps_per_epoch: int
) -> Optimisation:
    """The optimizer, the fp16 loss scaler (``train.precision: fp16``) and the schedule, in that order."""
    optimizer = build_optimizer(model, train, device)
    scaler = torch.amp.GradScaler(device.type) if train.precision == "fp16" else None
    return Optimisation(optimizer, build_scheduler(optimizer, train, steps_per_epoch), scaler)


def build_loading(tiles, train: TrainSettings, steps_per_epoch: int, processes: Processes) -> Loading:
    """The sampler and loader of this process's shard of the training ``tiles``, a step's tiles per batch."""
    sampler = EpochSampler(len(tiles), train.seed, processes.rank, processes.world_size)
    loader = DataLoader(
        tiles,
        train.batch_size * train.grad_accum_steps,
        sampler=sampler,
        drop_last=True,
        num_workers=train.num_workers,
        persistent_workers=train.num_workers > 0,
        pin_memory=processes.device.type == "cuda",
    )
    return Loading(sampler, loader, steps_per_epoch)
