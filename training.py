"""Train a U-Net (Ronneberger et al. 2015) from a YAML config.

    python training.py [--config config.yaml] [section.key=value ...]

for example ``python training.py train.lr=3e-4 unet.input_channels=[16,32,64,128]``. Each run writes
its resolved config, ``metrics.csv``, ``curves.png`` and a weight-map figure to ``log_path/<run>/`` and
its checkpoints ``last.pt`` and ``best.pt`` to ``save_path/<run>/``. ``train.resume=auto`` continues the
newest run exactly where it stopped; Ctrl-C saves ``last.pt`` first. ``overfit_one_batch.overfit=true``,
``hp_search=true`` or ``lr_find=true`` run a check of ``search.py`` instead of training (an overfit that
misses its tolerance exits with code 1).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import math
import os
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from config import HIGHER_IS_BETTER, ConfigError, UserError, architecture_differences, config_to_yaml, load_config
from dataset import EpochSampler, augment_batch, build_datasets, save_samples_figure
from losses import segmentation_loss
from infer import calibrate_threshold, predict_with_config, predicted_classes
from metrics import image_scores, pool_scores
from model import UNet, count_parameters

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")
CSV_COLUMNS = ("epoch", "step", "lr", "train_loss", "val_loss", "val_pixel_error", "val_dice", "val_iou", "val_rand_error", "val_vi", "epoch_seconds", "images_per_second")
CHECK_EVERY = 10  # steps between reading the loss on the host (a device sync) for the bar and the NaN check


def note(message: str) -> None:
    """A one-line notice to the user, printed without disturbing the progress bar (by process 0 alone
    when torchrun starts several)."""
    if os.environ.get("RANK", "0") == "0":
        tqdm.write(f"note: {message}", file=sys.stderr)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type's name), for one-line notices."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; an explicit device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"train.device is {name!r} but PyTorch sees no CUDA GPU here (a CPU-only build or no driver); use train.device=auto or cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"train.device is {name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device is 'mps' but the Apple GPU backend is not available here; use train.device=auto or cpu")
    return torch.device(name)


def build_model(unet: dict) -> UNet:
    """The U-Net described by the config's ``unet`` section."""
    return UNet(
        image_channels=unet["image_channels"],
        num_classes=unet["num_classes"],
        input_channels=unet["input_channels"],
        padding=unet["padding"],
        norm=unet["norm"],
        dropout=unet["dropout"],
        upsample=unet["upsample"],
    )


def build_optimizer(model: torch.nn.Module, train: dict, device: torch.device) -> torch.optim.Optimizer:
    """``train.optim`` over the model's parameters; bitsandbytes' 8-bit variant when asked and usable."""
    settings = {"lr": train["lr"], "weight_decay": train["weight_decay"]}
    if train["optim"] == "sgd":
        if train["use_bitsandbytes"]:
            note("train.use_bitsandbytes applies to adam and adamw only: using torch's SGD")
        return torch.optim.SGD(model.parameters(), momentum=train["momentum"], **settings)
    if train["use_bitsandbytes"]:
        optimizer_class = bitsandbytes_optimizer_class(train["optim"], device)
        if optimizer_class is not None:
            return optimizer_class(model.parameters(), **settings)
    optimizer_class = torch.optim.AdamW if train["optim"] == "adamw" else torch.optim.Adam
    return optimizer_class(model.parameters(), **settings)


def bitsandbytes_optimizer_class(optim: str, device: torch.device) -> type | None:
    """bitsandbytes' AdamW8bit / Adam8bit if it imports and can take a step on ``device``, else None."""
    try:
        # bitsandbytes logs warnings about its 4-bit kernels at import, which this optimizer does not use
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit if optim == "adamw" else bitsandbytes.optim.Adam8bit
        # bitsandbytes keeps 8-bit state only for tensors of >= 4096 elements: probe one that size
        probe = torch.nn.Parameter(torch.zeros(4096, device=device))
        probe.grad = torch.ones_like(probe)
        optimizer_class([probe]).step()
        return optimizer_class
    except Exception as error:  # it fails in many ways: not installed, no kernels for this device, ...
        note(f"bitsandbytes' 8-bit {optim} does not work on {device} ({first_line(error)}): using torch's {optim}")
        return None


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_factor: float = 0.0) -> float:
    """Learning rate at ``step`` as a fraction of the peak: linear warm-up, then the named decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule in ("cosine", "warmup-cosine"):
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule == "poly":
        decay = (1 - progress) ** 0.9  # nnU-Net's exponent
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return min_factor + (1 - min_factor) * decay


def augment_on_device(batch, settings: dict, seed: int, step: int, device: torch.device, rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
    """Move ``(image, label, weight)`` to the device and augment them there, with randomness fixed by
    ``(seed, step, rank)`` so that a resumed run sees the same augmentation and the processes of a
    distributed run draw different augmentations."""
    batch = [tensor.to(device, non_blocking=True) for tensor in batch]
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step * world_size + rank + 1)
    return list(augment_batch(*batch, settings, generator))


def autocast(device: torch.device, precision: str):
    """The autocast context of ``train.precision`` (fp32: none): convolutions run in bf16 or fp16,
    reductions such as the loss stay in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch,
    loss_kind: str,
    grad_clip: float,
    device: torch.device,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    accum_steps: int = 1,
    channels_last: bool = False,
) -> torch.Tensor:
    """One optimisation step on ``(image, label, weight map)``; returns the loss, still on the device
    (reading it would make the host wait for the device).

    With ``accum_steps`` > 1 the batch is split into that many micro-batches whose gradients add up
    (each loss weighted by its share of the batch); a DistributedDataParallel model then all-reduces
    the gradients once, after the last one. ``scaler`` (fp16) scales the loss against underflow.
    """
    image, label, weight = (tensor.to(device, non_blocking=True) for tensor in batch)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    micro_batches = list(zip(image.chunk(accum_steps), label.chunk(accum_steps), weight.chunk(accum_steps)))
    wrapped = getattr(model, "_orig_mod", model)  # under torch.compile's wrapper
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    for index, (micro_image, micro_label, micro_weight) in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with contextlib.nullcontext() if last or not isinstance(wrapped, DistributedDataParallel) else wrapped.no_sync():
            with autocast(device, precision):
                logits = model(micro_image)
            loss = segmentation_loss(loss_kind, logits.float(), micro_label, micro_weight) * (micro_image.shape[0] / image.shape[0])
            (scaler.scale(loss) if scaler else loss).backward()
        total += loss.detach()
    if scaler:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler:
        scaler.step(optimizer)  # skips the step when the scaled gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    return total


def evaluate(model: torch.nn.Module, dataset, device: torch.device, config: dict, rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Loss and scores on whole validation images, predicted tile by tile exactly as test.py does.

    ``val_pixel_error``, ``val_dice`` and ``val_iou`` pool the pixels of all images; for two classes,
    ``val_rand_error`` and ``val_vi`` (the ISBI 2012 measures on the cells) are means over the images.
    Two classes are told apart as ``infer.predicted_classes`` says, at ``predict.threshold`` (0.5 while
    it is ``auto``, not yet calibrated). With several processes each predicts every ``world_size``-th
    image and all of them get the scores of all images.
    """
    predict, num_classes = config["predict"], config["unet"]["num_classes"]
    threshold = 0.5 if predict["threshold"] == "auto" else predict["threshold"]
    losses, cell_scores = [], []
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for index in range(rank, len(dataset), world_size):
        image, label, weight = dataset[index]
        probabilities = predict_with_config(model, image.to(device), config).cpu()
        # log-probabilities are logits whose softmax is the probabilities, so the training loss applies
        log_probabilities = probabilities.clamp_min(1e-12).log()[None]
        losses.append(segmentation_loss(config["train"]["loss"], log_probabilities, label[None], weight[None]).item())
        image_confusion, cells = image_scores(predicted_classes(probabilities, threshold, predict["watershed_seeds"]), label, num_classes)
        confusion += image_confusion
        if cells:
            cell_scores.append(cells)
    if world_size > 1:
        shards: list = [None] * world_size
        dist.all_gather_object(shards, (losses, confusion, cell_scores))
        losses = [loss for shard in shards for loss in shard[0]]
        confusion = sum(shard[1] for shard in shards)
        cell_scores = [scores for shard in shards for scores in shard[2]]
    return {"val_loss": sum(losses) / len(losses), **{f"val_{key}": value for key, value in pool_scores(confusion, cell_scores).items()}}


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
    threshold, table = calibrate_threshold(cell_probabilities, labels, metric, predict["watershed_seeds"])
    save_checkpoint(checkpoint_path, {**state, "threshold": threshold, "threshold_table": table})
    at = {row["threshold"]: row for row in table}
    print(f"calibrated predict.threshold on {len(labels)} validation images: {threshold:.2f} ({metric} {at[threshold][metric]:.4f}; at 0.50: {at[0.5][metric]:.4f}), stored in {checkpoint_path}")
    return threshold


def improved(value: float, best: float | None, metric: str) -> bool:
    """Whether ``value`` of ``train.best_metric`` beats ``best`` (None: nothing to beat yet)."""
    if best is None:
        return True
    return value > best if metric in HIGHER_IS_BETTER else value < best


def save_checkpoint(path: Path, state: dict) -> None:
    """Write with torch.save to a temporary file, then rename: a crash never leaves half a checkpoint."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's contents, loaded with ``weights_only=True``: a checkpoint is data, never code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint not found") from None
    except Exception as error:
        raise UserError(f"{path}: not a readable checkpoint ({first_line(error)})") from None
    if not isinstance(state, dict) or not {"model", "config", "progress"} <= state.keys():
        raise UserError(f"{path}: not a checkpoint written by this project's training.py")
    return state


def check_architecture(state: dict, config: dict, path: Path) -> None:
    """Raise a UserError naming the ``unet.*`` keys where the checkpoint and ``config`` disagree."""
    differences = architecture_differences(state["config"], config)
    if differences:
        raise UserError(f"{path} holds another architecture ({'; '.join(differences)}): set these keys as in the checkpoint, or start a new run")


def load_checkpoint(path: Path, config: dict) -> dict:
    """``read_checkpoint``, checked to hold the architecture that ``config`` describes."""
    state = read_checkpoint(path)
    check_architecture(state, config, path)
    return state


def find_resume_checkpoint(resume: str | None, save_path: Path) -> Path | None:
    """The checkpoint named by ``train.resume``: ``auto`` = the newest ``last.pt`` under ``save_path``."""
    if resume is None:
        return None
    if resume == "auto":
        candidates = sorted(save_path.glob("*/last.pt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            note(f"train.resume=auto: no checkpoint in {save_path}/*/last.pt yet, starting a new run")
            return None
        return candidates[-1]
    path = Path(resume)
    if not path.is_file():
        raise UserError(f"train.resume: checkpoint {path} not found (use auto to pick the newest run in {save_path})")
    return path


def new_run_name(train: dict, label: str | None = None) -> str:
    """``run_name``, or date-time-``label`` (default: the data set); suffixed -2, -3 ... so that no earlier
    run is overwritten."""
    base = train["run_name"] or f"{datetime.now():%Y-%m-%d_%H%M%S}-{label or train['dataset_name']}"
    name, count = base, 1
    while (Path(train["log_path"]) / name).exists() or (Path(train["save_path"]) / name).exists():
        count += 1
        name = f"{base}-{count}"
    if train["run_name"] and name != base:
        note(f"run folder {base} exists already: writing to {name}")
    return name


def read_metrics(path: Path, completed_epochs: int) -> list[dict]:
    """The rows of a resumed run's first ``completed_epochs`` epochs (later ones are trained again)."""
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        return [row for row in csv.DictReader(file) if int(row["epoch"]) <= completed_epochs]


def write_metrics(path: Path, rows: list[dict]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)


def plot_curves(rows: list[dict], path: Path) -> None:
    """Training and validation curves by epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        points = [(int(row["epoch"]), float(row[key])) for row in rows if row.get(key) not in (None, "")]
        return [p[0] for p in points], [p[1] for p in points]

    figure, (loss_axis, score_axis, vi_axis) = plt.subplots(1, 3, figsize=(16, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        loss_axis.plot(*series(key), marker=".", label=label)
    loss_axis.set(xlabel="epoch", ylabel="loss", title="loss")
    loss_axis.set_yscale("log")
    for key, label in (("val_dice", "Dice (foreground)"), ("val_iou", "IoU (foreground)"), ("val_pixel_error", "pixel error"), ("val_rand_error", "Rand error (cells)")):
        score_axis.plot(*series(key), marker=".", label=label)
    score_axis.set(xlabel="epoch", ylim=(0, 1), title="validation")
    vi_axis.plot(*series("val_vi"), marker=".", label="variation of information (cells)")
    vi_axis.set(xlabel="epoch", ylabel="bits", title="validation: variation of information")
    for axis in (loss_axis, score_axis, vi_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    temporary = path.with_name(path.stem + ".tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, path)


@contextlib.contextmanager
def stop_requests():
    """Within the block, Ctrl-C or SIGTERM (as cluster schedulers send) only sets a flag (a non-empty list),
    so that the loop can stop after a whole step and save a consistent ``last.pt``; a second Ctrl-C
    stops at once, without saving."""
    requested: list[int] = []

    def request(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        tqdm.write("stopping after this step and saving last.pt (Ctrl-C again to stop at once, without saving)", file=sys.stderr)

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield requested
        return
    previous = {number: signal.signal(number, request) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def restore(checkpoint: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler, device: torch.device) -> dict:
    """Load a checkpoint's model, optimizer, scheduler, loss scaler and random states; returns its progress."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if device.type == "cuda" and checkpoint["rng"].get("cuda"):
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    return checkpoint["progress"]


def start_run_folders(config: dict, run_log: Path, run_weights: Path, progress: dict, data: dict, device: torch.device, resumed: bool) -> None:
    """Create the run's folders and write its resolved config; a new run also gets the figures of a
    weight map and of augmented tiles, to check by eye before trusting the training."""
    run_log.mkdir(parents=True, exist_ok=True)
    run_weights.mkdir(parents=True, exist_ok=True)
    config_file = run_log / (f"config-resumed-epoch{progress['epoch']}.yaml" if resumed else "config.yaml")
    config_file.write_text(config_to_yaml(config))
    if resumed:
        return
    save_samples_figure(run_log / "weight_map.png", *(torch.from_numpy(array)[None] for array in data["example"]), title="first training image and its weight map")
    train_set = data["train"]
    examples = [torch.stack(tensors) for tensors in zip(*(train_set[i] for i in range(min(4, len(train_set)))))]
    augmented = augment_on_device(examples, config["augment"], config["train"]["seed"], -1, device)
    save_samples_figure(run_log / "augmented_samples.png", *augmented, title="augmented training tiles (the loss uses the centre of label and weight)")


@contextlib.contextmanager
def process_group(device_name: str):
    """Yield ``(rank, world_size, device)``. Launched by torchrun (``WORLD_SIZE`` > 1 in the
    environment), join its process group for DistributedDataParallel: NCCL with one GPU per process
    (``cuda:LOCAL_RANK``), or gloo on CPUs; leave it again at the end."""
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield 0, 1, device
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started process {local_rank} on this node but only {torch.cuda.device_count()} GPU(s) are visible: lower --nproc_per_node")
        device = torch.device("cuda", local_rank)  # one GPU per process, whatever train.device names
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"distributed training runs on CUDA GPUs (NCCL) or on CPUs (gloo), not on {device}: set train.device=auto or cpu")
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield rank, world_size, device
    finally:
        if joined:
            dist.destroy_process_group()


def from_rank_zero(value, world_size: int):
    """Process 0's ``value`` in every process (a run name, a checkpoint path)."""
    if world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train(config: dict) -> dict:
    """Train as the config says, in this process or, under torchrun, in each of its processes; returns a
    summary: the trained model, run folders, progress (epoch, step, best value of ``train.best_metric``
    and its epoch), the last validation scores, and whether it was interrupted."""
    with process_group(config["train"]["device"]) as (rank, world_size, device):
        return train_process(config, rank, world_size, device)


def train_process(config: dict, rank: int, world_size: int, device: torch.device) -> dict:
    """``train`` in process ``rank`` of ``world_size``: all of them train, process 0 alone prints, logs
    and saves."""
    train_config, unet = config["train"], config["unet"]
    main_process = rank == 0
    save_path, log_path = Path(train_config["save_path"]), Path(train_config["log_path"])
    resume_path = from_rank_zero(find_resume_checkpoint(train_config["resume"], save_path), world_size)
    checkpoint = load_checkpoint(resume_path, config) if resume_path else None
    precision = train_config["precision"]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the tile size is fixed: let cuDNN pick its fastest kernels once
        torch.backends.cuda.matmul.allow_tf32 = True
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise UserError(f"train.precision=bf16 needs a GPU with bfloat16 (Ampere or newer); {torch.cuda.get_device_name(device)} has none: use train.precision=fp16")

    torch.manual_seed(train_config["seed"])
    data = build_datasets(config, note)
    train_set, batch_size, accum_steps = data["train"], train_config["batch_size"], train_config["grad_accum_steps"]
    step_batch = batch_size * accum_steps * world_size
    steps_per_epoch = len(train_set) // step_batch
    if steps_per_epoch == 0:
        raise UserError(
            f"an optimisation step needs {step_batch} tiles (train.batch_size x train.grad_accum_steps x {world_size} processes) but an epoch has "
            f"{len(train_set)}: lower them or raise train.samples_per_image"
        )
    model = build_model(unet).to(device)
    model.activation_checkpointing = train_config["activation_checkpointing"]
    if train_config["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, train_config, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    total_steps = train_config["max_epochs"] * steps_per_epoch
    warmup_steps = round(train_config["warmup_epochs"] * steps_per_epoch)
    min_factor = train_config["min_lr"] / train_config["lr"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, train_config["scheduler_type"], min_factor)
    )
    if checkpoint:
        progress = restore(checkpoint, model, optimizer, scheduler, scaler, device)
    else:
        progress = {"epoch": 0, "batch": 0, "step": 0, "best_value": None, "best_epoch": -1, "loss_sum": 0.0, "run_name": from_rank_zero(new_run_name(train_config) if main_process else None, world_size)}
    run_log, run_weights = log_path / progress["run_name"], save_path / progress["run_name"]
    if main_process:
        start_run_folders(config, run_log, run_weights, progress, data, device, resumed=checkpoint is not None)

    # DDP all-reduces the gradients during the backward pass; evaluation and checkpoints use the bare model
    step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else model
    compiling = train_config["compile"]
    if compiling:
        step_model = torch.compile(step_model)
    step_options = {"loss_kind": train_config["loss"], "grad_clip": train_config["grad_clip"], "device": device, "precision": precision, "scaler": scaler, "accum_steps": accum_steps, "channels_last": train_config["channels_last"]}
    sampler = EpochSampler(len(train_set), train_config["seed"], rank, world_size)
    workers = train_config["num_workers"]
    loader = DataLoader(train_set, batch_size * accum_steps, sampler=sampler, drop_last=True, num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    metrics_path = run_log / "metrics.csv"
    rows = read_metrics(metrics_path, progress["epoch"])

    def state() -> dict:
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None, "config": config, "progress": dict(progress), "rng": rng}

    def summary(interrupted: bool, scores: dict) -> dict:
        return {"interrupted": interrupted, "model": model, "run_log": run_log, "run_weights": run_weights, "scores": scores, **progress}

    if main_process:
        split = f" = {batch_size} x {accum_steps} accumulated x {world_size} processes" if step_batch != batch_size else ""
        print(
            f"U-Net {count_parameters(model):,} parameters on {device}" + (f" in each of {world_size} processes" if world_size > 1 else "")
            + f", {precision}; {len(train_set)} tiles of {train_config['tile_size']} px per epoch ({steps_per_epoch} steps of {step_batch}{split}), "
            f"{len(data['val'])} validation images\nrun {progress['run_name']}: logs in {run_log}, checkpoints in {run_weights}"
            + (f"\nresuming {resume_path} at epoch {progress['epoch'] + 1}, batch {progress['batch']}" if checkpoint else ""),
            flush=True,
        )
    model.train()
    last_scores: dict = {}
    best_metric = train_config["best_metric"]
    max_epochs = train_config["max_epochs"]
    with stop_requests() as stop_requested:
        for epoch in range(progress["epoch"], max_epochs):
            sampler.set_epoch(epoch, start=progress["batch"] * batch_size * accum_steps)
            epoch_start, images_seen = time.perf_counter(), 0
            loss_sum = torch.tensor(progress["loss_sum"], device=device)
            bar = tqdm(total=steps_per_epoch, initial=progress["batch"], desc=f"epoch {epoch + 1}/{max_epochs}", unit="step", dynamic_ncols=True, leave=False, disable=not main_process)
            for batch in loader:
                batch = augment_on_device(batch, config["augment"], train_config["seed"], progress["step"], device, rank, world_size)
                try:
                    loss = train_step(step_model, optimizer, batch, **step_options)
                except Exception as error:  # compiling needs a C++ compiler (Triton on GPUs) and can fail in many ways
                    if not compiling:
                        raise
                    note(f"torch.compile failed ({first_line(error)}): training without it")
                    step_model = step_model._orig_mod
                    loss = train_step(step_model, optimizer, batch, **step_options)
                compiling = False
                loss_sum += loss
                scheduler.step()
                progress["step"] += 1
                progress["batch"] += 1
                images_seen += batch[0].shape[0] * world_size
                bar.update()
                # processes stop together: they agree at the same steps, so a Ctrl-C waits for the next one
                if progress["batch"] % CHECK_EVERY == 0 or progress["batch"] == steps_per_epoch or (stop_requested and world_size == 1):
                    totals = torch.stack((loss_sum, torch.tensor(float(bool(stop_requested)), device=device)))
                    if world_size > 1:
                        dist.all_reduce(totals)
                    loss_total, stop_votes = totals.tolist()
                    progress["loss_sum"] = loss_total / world_size
                    if not math.isfinite(progress["loss_sum"]):
                        raise UserError(
                            f"the training loss became {progress['loss_sum']} in epoch {epoch + 1} (step {progress['step']}): lower train.lr "
                            f"(now {train_config['lr']}) or set train.grad_clip; the checkpoints in {run_weights} were left as they were"
                        )
                    speed = images_seen / (time.perf_counter() - epoch_start)
                    bar.set_postfix(loss=f"{progress['loss_sum'] / progress['batch']:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", img_s=f"{speed:.1f}")
                    if stop_votes:
                        bar.close()
                        share_buffers(model, world_size)
                        if main_process:
                            save_checkpoint(run_weights / "last.pt", state())
                            write_metrics(metrics_path, rows)
                            print(f"\nstopped: saved {run_weights / 'last.pt'} (epoch {epoch + 1}, batch {progress['batch']}); continue with train.resume=auto", file=sys.stderr)
                        return summary(True, last_scores)
            bar.close()
            share_buffers(model, world_size)
            seconds = time.perf_counter() - epoch_start
            row = {"epoch": epoch + 1, "step": progress["step"], "lr": scheduler.get_last_lr()[0], "train_loss": progress["loss_sum"] / steps_per_epoch, "epoch_seconds": round(seconds, 2), "images_per_second": round(images_seen / seconds, 2)}
            progress.update(epoch=epoch + 1, batch=0, loss_sum=0.0)
            last_epoch = epoch + 1 == max_epochs
            stop = False
            if (epoch + 1) % train_config["eval_epoch"] == 0 or last_epoch:
                last_scores = evaluate(model, data["val"], device, config, rank, world_size)
                row.update(last_scores)
                if not math.isfinite(last_scores["val_loss"]):
                    raise UserError(f"the validation loss became {last_scores['val_loss']} in epoch {epoch + 1}: lower train.lr; checkpoints left as they were in {run_weights}")
                if improved(last_scores[best_metric], progress["best_value"], best_metric):
                    progress.update(best_value=last_scores[best_metric], best_epoch=epoch + 1)
                    if main_process:
                        save_checkpoint(run_weights / "best.pt", state())
                patience = train_config["early_stopping"]
                stop = patience > 0 and epoch + 1 - progress["best_epoch"] >= patience
            if main_process:
                tqdm.write(
                    f"epoch {epoch + 1}/{max_epochs}  train_loss {row['train_loss']:.4f}"
                    + "".join(f"  {key} {row[key]:.4f}" for key in ("val_loss", "val_pixel_error", "val_dice", "val_rand_error") if key in row)
                    + f"  {seconds:.1f} s"
                )
            rows.append(row)
            # metrics first: a run killed between the two writes resumes with every logged row
            if main_process and ((epoch + 1) % train_config["log_epoch"] == 0 or last_epoch or stop or stop_requested):
                write_metrics(metrics_path, rows)
                plot_curves(rows, run_log / "curves.png")
            if main_process and ((epoch + 1) % train_config["save_epoch"] == 0 or last_epoch or stop or stop_requested):
                save_checkpoint(run_weights / "last.pt", state())
            if stop_requested and world_size == 1:
                print(f"stopped: saved {run_weights / 'last.pt'} after epoch {epoch + 1}; continue with train.resume=auto", file=sys.stderr)
                return summary(True, last_scores)
            if stop:
                if main_process:
                    print(f"early stopping: no better {best_metric} for {patience} epochs (best at epoch {progress['best_epoch']})")
                break
    if main_process:
        print(f"done: best {best_metric} {progress['best_value']:.4f} at epoch {progress['best_epoch']}; {run_weights / 'best.pt'}")
        if config["predict"]["threshold"] == "auto" and unet["num_classes"] == 2:
            calibrate(run_weights / "best.pt", data["val"], device, config)
    return summary(False, last_scores)


def share_buffers(model: torch.nn.Module, world_size: int) -> None:
    """Give every process process 0's buffers (BatchNorm's running statistics, which each process
    updates from its own batches), so that all of them evaluate and end with the same model."""
    if world_size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a U-Net from a YAML config.", epilog="overrides: section.key=value, values read as YAML, e.g. train.lr=3e-4 unet.input_channels=[16,32,64,128]")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: config.yaml beside this script)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        notices: list[str] = []
        config = load_config(args.config, args.overrides, notices)
        for message in notices:
            note(message)
        import search  # here, not at the top: search imports this module

        modes = config["overfit_one_batch"]
        if modes["lr_find"]:
            search.lr_find(config)
            return 0
        if modes["overfit"]:
            return 0 if search.overfit_batch(config)["reached"] else 1
        if modes["hp_search"]:
            summary = search.hp_search(config)
            result = summary.get("train", summary)
        else:
            result = train(config)
    except KeyboardInterrupt:
        print("\nstopped at once, without saving: the checkpoints keep their last saved state", file=sys.stderr)
        return 130
    except UserError as error:
        prefix = "config error" if isinstance(error, ConfigError) else "error"
        for line in str(error).splitlines() if os.environ.get("RANK", "0") == "0" else ():
            print(f"{prefix}: {line}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    return 130 if result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
