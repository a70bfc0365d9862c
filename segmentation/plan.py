"""The run's plan: every choice made from the settings and the data, decided once and stored with the model.

As nnU-Net writes its ``plans.json``, a run decides once, after reading its data, everything that the
settings leave to the data or to ``auto``: the network's outputs (the user's classes, and the border of
objects as a class of its own for masks of object ids), how the masks were read, the class weights of the
loss, the training tile and its labelled output, the tile of whole-image prediction, the decision
threshold (calibrated after training under ``predict.threshold: auto``) and the rules that clean predicted
objects (``predict.min_object_size``, ``fill_holes``). The ``Plan`` holds these with no ``auto`` left; it
goes into every checkpoint under ``plan`` and beside the run's ``config.yaml`` as ``plan.json``, and
training, test.py, export and the benchmarks read it instead of deciding again. It has room for what
volumes and sparse labels add (spatial dimensions, voxel spacing, the value of unannotated pixels).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model import output_size, valid_input_sizes
from segmentation.config import AUTO_TILE_SIDE, Config, UserError, auto_tile_size, stored_boundary_class
from segmentation.data.weight_maps import balanced_class_weights
from segmentation.geometry import axis_geometry, volume_tile
from segmentation.settings import DataSettings, PredictSettings, UNetSettings

PLAN_VERSION = 1
DEFAULT_PREDICT_TILE = {0: 572, 1: 512}  # predict.tile_size: auto: the paper's tile; a common same-size tile
SMALL_OBJECT_PERCENTILE = 5  # predict.min_object_size: auto: the area of a small whole training object ...
SMALL_OBJECT_FRACTION = 0.5  # ... of which a predicted object must have at least this share
NORMALIZATION = "zero mean, unit variance over each image (all its pixels and channels)"
THRESHOLD_SOURCES = ("set", "calibrated", "uncalibrated")  # predict.threshold given; auto after / before calibration


@dataclass(frozen=True)
class Plan:
    """What a run decided from its settings and data; every field is a plain value, none ``auto``.

    ``dims`` spatial dimensions of images and network; ``spacing`` the pixel spacing along each axis where
    known (None: pixels); ``image_channels`` the network's input channels; ``num_classes`` the user's
    classes; ``boundary_class`` whether the network also learns object borders (its outputs are
    ``label_classes`` = num_classes + 1); ``mask_reading`` how the training masks were read
    (``classes``, ``instances`` or ``generated``); ``ignore_value`` the mask value of unannotated pixels
    (``train.ignore_value``; None: every pixel is annotated), ``ignore_color`` their colour in colour masks;
    ``class_weights`` one loss weight per label class (None: all 1);
    ``tile_size`` and ``output_size`` the training tile's input and labelled output sides in pixels;
    ``predict_tile_size`` the largest input tile of whole-image prediction; ``threshold`` the class-1
    probability from which a pixel is class 1 (two classes), ``threshold_source`` whether it was set,
    calibrated on the validation images, or is 0.5 awaiting calibration; ``learnt_object_size`` half the
    area of a small whole training object (0 without object ids), ``min_object_size`` and ``fill_holes``
    the rules that clean predicted objects (pixels at the image's own size).
    """

    image_channels: int
    num_classes: int
    boundary_class: bool
    mask_reading: str
    class_weights: tuple[float, ...] | None
    tile_size: int
    output_size: int
    predict_tile_size: int
    threshold: float
    threshold_source: str
    learnt_object_size: int
    min_object_size: int
    fill_holes: bool
    normalization: str = NORMALIZATION
    dims: int = 2
    spacing: tuple[float, ...] | None = None
    ignore_value: float | None = None
    ignore_color: tuple[int, ...] | None = None
    kernel_sizes: tuple[tuple[int, ...], ...] | None = None
    pool_sizes: tuple[tuple[int, ...], ...] | None = None
    tile_depth: int = 1
    output_depth: int = 1
    predict_tile_depth: int = 1

    @property
    def tile_shape(self) -> int | tuple[int, int, int]:
        """The training tile's input side (2D), or its (depth, height, width) in voxels (3D)."""
        return self.tile_size if self.dims == 2 else (self.tile_depth, self.tile_size, self.tile_size)

    @property
    def output_shape(self) -> int | tuple[int, int, int]:
        """The training tile's labelled output side (2D), or its (depth, height, width) (3D)."""
        return self.output_size if self.dims == 2 else (self.output_depth, self.output_size, self.output_size)

    @property
    def predict_tile(self) -> int | tuple[int, int, int]:
        """The largest input tile of whole-image prediction: a side (2D) or (depth, height, width) (3D)."""
        return self.predict_tile_size if self.dims == 2 else (self.predict_tile_depth, *(self.predict_tile_size,) * 2)

    @property
    def label_classes(self) -> int:
        """The network's outputs: the user's classes, then the object border where it is a class."""
        return self.num_classes + int(self.boundary_class)

    @property
    def sparse(self) -> bool:
        """Whether masks may leave pixels unannotated (``train.ignore_value`` or ``ignore_color`` set)."""
        return self.ignore_value is not None or self.ignore_color is not None

    @property
    def instance_data(self) -> bool:
        """Whether the training masks held object ids."""
        return self.mask_reading == "instances"

    def to_dict(self) -> dict:
        """Plain data (lists for tuples) with the plan's version: what checkpoints and plan.json store."""
        data = dataclasses.asdict(self)
        for key in ("class_weights", "spacing", "ignore_color"):
            data[key] = None if data[key] is None else list(data[key])
        for key in ("kernel_sizes", "pool_sizes"):
            data[key] = None if data[key] is None else [list(sizes) for sizes in data[key]]
        return {"version": PLAN_VERSION, **data}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Plan:
        """The plan stored as ``data`` (``to_dict``); a UserError naming ``where`` for one that was edited
        into something else or comes from a newer version."""
        names = {item.name for item in dataclasses.fields(cls)}
        required = {item.name for item in dataclasses.fields(cls) if item.default is dataclasses.MISSING}
        if not isinstance(data, dict) or not required <= data.keys() or not data.keys() - {"version"} <= names:
            raise UserError(f"{where}: its plan is not one this version reads (edited, or from another version)")
        if data.get("version", PLAN_VERSION) > PLAN_VERSION:
            raise UserError(f"{where}: its plan is of version {data['version']}; update this repository to read it")
        values = {key: value for key, value in data.items() if key != "version"}
        try:
            for key, kind in (("class_weights", float), ("spacing", float), ("ignore_color", int)):
                if values.get(key) is not None:
                    values[key] = tuple(kind(item) for item in values[key])
            for key in ("kernel_sizes", "pool_sizes"):
                if values.get(key) is not None:
                    values[key] = tuple(tuple(int(size) for size in sizes) for sizes in values[key])
        except (TypeError, ValueError):
            raise UserError(
                f"{where}: its plan is not one this version reads (edited, or from another version)"
            ) from None
        plan = cls(**values)
        problem = plan.problem()
        if problem:
            raise UserError(f"{where}: its plan {problem} (edited?); train again or restore the checkpoint")
        return plan

    def problem(self) -> str | None:
        """What makes this plan impossible, in words, or None."""
        if self.threshold_source not in THRESHOLD_SOURCES or not 0 < self.threshold < 1:
            return f"has threshold {self.threshold!r} ({self.threshold_source!r})"
        if self.class_weights is not None and len(self.class_weights) != self.label_classes:
            return f"has {len(self.class_weights)} class weights for {self.label_classes} classes"
        if self.boundary_class and self.num_classes != 2:
            return "has a border class beside more than two classes"
        sizes = (self.tile_size, self.output_size, self.predict_tile_size, self.tile_depth, self.output_depth)
        if self.dims not in (2, 3) or min(sizes) < 1:
            return "has impossible sizes"
        if self.dims == 3 and (self.kernel_sizes is None or self.pool_sizes is None or self.spacing is None):
            return "is of a 3D network without its kernel and pooling sizes or spacing"
        return None

    def calibrated(self, threshold: float) -> Plan:
        """This plan with the threshold calibrated after training (``predict.threshold: auto``)."""
        return dataclasses.replace(self, threshold=float(threshold), threshold_source="calibrated")

    def for_prediction(self, predict: PredictSettings) -> Plan:
        """This plan with the values that ``predict`` sets explicitly on top (a test.py override, say):
        a number for ``threshold``, ``min_object_size`` or ``tile_size``, true or false for ``fill_holes``;
        ``auto`` keeps the plan's decision."""
        changes: dict[str, Any] = {}
        if predict.threshold != "auto":
            changes.update(threshold=float(predict.threshold), threshold_source="set")
        if predict.min_object_size != "auto":
            changes["min_object_size"] = int(predict.min_object_size)
        if predict.fill_holes != "auto":
            changes["fill_holes"] = bool(predict.fill_holes)
        if predict.tile_size not in (None, "auto"):
            changes["predict_tile_size"] = int(predict.tile_size)
        return dataclasses.replace(self, **changes)


def decide_plan(
    unet: UNetSettings,
    data: DataSettings,
    predict: PredictSettings,
    train_images: Sequence,
    note: Callable[[str], None] = print,
) -> Plan:
    """The plan of a run from its settings and its training images' cache entries (``cache.PreparedImage``:
    how each mask was read, its class counts and whole objects); the decisions that have a notice to give
    pass it to ``note``."""
    readings = sorted({image.mask_read_as for image in train_images})
    instance_data = readings == ["instances"]
    boundary = boundary_class_of(unet, instance_data, train_images)
    weights = class_weights_of(data.class_weights, train_images, unet.num_classes + boundary)
    volume = volume_decisions(unet, data, train_images, note) if unet.dims == 3 else {}
    tile = volume.pop("tile_size", None) or training_tile_size(data.tile_size, unet.depth, unet.padding, note)
    learnt = learnt_min_object_size(np.array([area for image in train_images for area in image.object_areas]))
    automatic = Plan(
        image_channels=unet.image_channels,
        num_classes=unet.num_classes,
        boundary_class=boundary,
        mask_reading="+".join(readings),
        class_weights=None if weights is None else tuple(float(weight) for weight in weights),
        tile_size=tile,
        output_size=volume.pop("output_size", None) or output_size(tile, unet.depth, unet.padding),
        predict_tile_size=volume.pop("predict_tile_size", None) or DEFAULT_PREDICT_TILE[unet.padding],
        threshold=0.5,
        threshold_source="uncalibrated",
        learnt_object_size=learnt,
        # auto cleans the objects of models trained on object ids and leaves class masks as predicted
        min_object_size=learnt if instance_data else 0,
        fill_holes=instance_data,
        ignore_value=data.ignore_value,
        ignore_color=data.ignore_color,
        **volume,
    )
    absent = [c for c, count in enumerate(class_totals(train_images, unet.num_classes)) if count == 0]
    if absent and train_images and (data.ignore_value is not None or data.ignore_color is not None):
        raise UserError(
            f"train.ignore_value: no training pixel is of class {absent[0]} once the unannotated pixels are set "
            "apart (with 0/255 masks, 255 is class 1): choose an ignore value that no class uses, e.g. 128"
        )
    return automatic.for_prediction(predict)


def volume_decisions(
    unet: UNetSettings, data: DataSettings, train_images: Sequence, note: Callable[[str], None]
) -> dict[str, Any]:
    """The plan's fields of a 3D run (``unet.dims: 3``): the voxel spacing (the training volumes'), the kernel and
    pooling sizes per level and axis from it (``geometry.kernels_and_pools``, nnU-Net's rule), and the training and
    prediction tiles (``geometry.volume_tile``, ``train.tile_size`` and ``tile_depth``); a UserError names a
    training image that is no volume, or one with fewer sections than the network needs."""
    flat = next((image.name for image in train_images if image.dims != 3), None)
    if flat is not None:
        raise UserError(f"{flat}: a 2D image, but unet.dims: 3 trains on volumes: give TIFF stacks, or unet.dims: 2")
    spacings = sorted({image.spacing for image in train_images if image.spacing is not None})
    spacing = tuple(float(size) for size in np.median(spacings, axis=0)) if spacings else (1.0, 1.0, 1.0)
    if len(spacings) > 1:
        note(
            f"the training volumes' voxel spacings differ ({len(spacings)} of them): planned for their median {spacing}"
        )
    in_plane = None if data.tile_size == "auto" else int(data.tile_size)
    sections = None if data.tile_depth == "auto" else int(data.tile_depth)
    try:
        largest = [int(side) for side in np.max([image.shape for image in train_images], axis=0)]
        (depth, side, _), kernels, pools = volume_tile(spacing, unet.depth, unet.padding, in_plane, sections, largest)
    except ValueError as error:
        raise UserError(f"train.tile_size, tile_depth: {error}") from None
    along_z, in_plane_axis = axis_geometry(kernels, pools, 0), axis_geometry(kernels, pools, 2)
    smallest = output_size(
        valid_input_sizes(1, unet.depth, unet.padding, *along_z)[1], unet.depth, unet.padding, *along_z
    )
    short = next((image for image in train_images if image.shape[0] < smallest), None)
    if short is not None:
        raise UserError(
            f"{short.name}: {short.shape[0]} sections, fewer than the {smallest} a tile of this network covers along z "
            "(its smallest valid output): give a longer stack, fewer poolings (unet.input_channels) or unet.dims: 2"
        )
    note(
        f"3D plan: voxel spacing {spacing} (z, y, x); kernels {kernels} and poolings {pools} per level and axis "
        f"(nnU-Net's rule: z pooled once its spacing is within 2x of y's and x's); training tile {depth} x {side} x "
        f"{side} voxels (train.tile_depth, tile_size)"
    )
    return {
        "dims": 3,
        "spacing": spacing,
        "kernel_sizes": kernels,
        "pool_sizes": pools,
        "tile_size": side,
        "tile_depth": depth,
        "output_depth": output_size(depth, unet.depth, unet.padding, *along_z),
        "output_size": output_size(side, unet.depth, unet.padding, *in_plane_axis),
        "predict_tile_size": side,
        "predict_tile_depth": depth,
    }


def training_tile_size(
    tile_size: int | str, depth: int, padding: int, note: Callable[[str], None] | None = None
) -> int:
    """``train.tile_size``: a number as given (a UserError where the network cannot take it), or for ``auto``
    the valid input size nearest ``AUTO_TILE_SIDE`` for the network's depth and padding, with a notice to
    ``note`` where given."""
    if tile_size != "auto":
        try:
            output_size(tile_size, depth, padding)
        except ValueError as error:
            raise UserError(f"train.tile_size: {error}") from None
        return tile_size
    side = auto_tile_size(depth, padding)
    if note is None:
        return side
    note(
        f"train.tile_size auto: {side} px, the valid input nearest {AUTO_TILE_SIDE} px (a sensible side) "
        f"for depth {depth} and padding {padding}"
    )
    return side


def boundary_class_of(unet: UNetSettings, instance_data: bool, train_images: Sequence) -> bool:
    """``unet.boundary_class``, ``auto`` decided: the object borders are a class of their own where the
    training masks hold object ids of two classes. ``true`` on masks read as classes is a UserError: their
    objects' borders are not known."""
    if unet.boundary_class == "auto":
        return instance_data and unet.num_classes == 2
    named = next((image.name for image in train_images if image.mask_read_as != "instances"), None)
    if unet.boundary_class and named is not None:
        raise UserError(
            f"unet.boundary_class: true learns the borders of objects from masks of object ids, but the masks "
            f"were read as classes (e.g. {named}): set train.mask_type: instances, or unet.boundary_class: false"
        )
    return bool(unet.boundary_class)


def class_weights_of(setting: str | Sequence[float], train_images: Sequence, label_classes: int) -> np.ndarray | None:
    """``train.class_weights``: ``balanced`` (from the pixel counts of the training images), ``none``
    (None) or the given list, as (K,) float32 for the ``label_classes`` the network learns."""
    if setting == "balanced":
        return balanced_class_weights(class_totals(train_images, label_classes))
    if setting == "none":
        return None
    weights = list(setting)
    # one weight per user class with the boundary class on: the border weighs as its object
    return np.asarray(weights + weights[-1:] * (label_classes - len(weights)), dtype=np.float32)


def class_totals(images: Sequence, classes: int) -> np.ndarray:
    """(classes,) int64 pixel counts of cache entries ``images``, the border folded into its object for
    a network without the border class (``classes`` = 2)."""
    totals = np.zeros(classes, dtype=np.int64)
    for image in images:
        counts = np.asarray(image.class_counts, dtype=np.int64)
        totals[: classes - 1] += counts[: classes - 1]
        totals[classes - 1] += counts[classes - 1 :].sum()
    return totals


def learnt_min_object_size(areas: np.ndarray) -> int:
    """``predict.min_object_size: auto``: half the area of a small whole training object (the 5th
    percentile of ``areas``, pixels of the objects that the image border does not cut); 0 without objects."""
    areas = np.asarray(areas)
    if areas.size == 0:
        return 0
    return int(SMALL_OBJECT_FRACTION * np.percentile(areas, SMALL_OBJECT_PERCENTILE))


def reading_problem(plan: Plan, train_images: Sequence) -> str | None:
    """Why training images (cache entries) do not fit the plan of the run they are to continue: masks that
    now read another way than the plan recorded (None when they fit)."""
    now = "+".join(sorted({image.mask_read_as for image in train_images}))
    if now != plan.mask_reading:
        return (
            f"its run read the training masks as {plan.mask_reading}, they now read as {now}: set train.mask_type "
            "as the run had it"
        )
    return None


def ignore_problem(plan: Plan, data: DataSettings) -> str | None:
    """Why the data settings of a run to continue set apart other unannotated pixels than its plan recorded
    (``train.ignore_value``, ``ignore_color``), or None."""
    if (plan.ignore_value, plan.ignore_color) != (data.ignore_value, data.ignore_color):
        return (
            f"its run set apart the mask value {plan.ignore_value} (colour {plan.ignore_color}) as unannotated, "
            f"the config {data.ignore_value} (colour {data.ignore_color}): set train.ignore_value as the run had it"
        )
    return None


def write_plan(path: Path, plan: Plan) -> None:
    """``plan.json`` beside a run's config.yaml: the plan for people to read (checkpoints hold it too)."""
    path.write_text(json.dumps(plan.to_dict(), indent=2) + "\n")


def stored_plan(state: dict, config: Config, where: str, train_images: Sequence | None = None) -> Plan:
    """The plan of a checkpoint ``state`` (``where``: its path, for messages), as its run decided it; the
    caller puts the ``predict`` settings in force on top (``Plan.for_prediction``).

    A checkpoint from before plans kept its decisions in its stored config (``unet.boundary_class`` and
    ``train.tile_size`` as its run decided them: ``config``, resolved from it) and beside it
    (``threshold``, ``objects``). Its balanced class weights, which it did not store, are decided again
    from ``train_images`` where given, else left out: they only weigh the loss that test.py reports."""
    if "plan" in state:
        return Plan.from_dict(state["plan"], where)
    unet, data = config.unet, config.data
    boundary = stored_boundary_class(state["config"])
    record = state.get("objects", {"instance_data": False, "learnt_size": 0})
    weights = None
    if data.class_weights != "balanced" or train_images is not None:
        weights = class_weights_of(data.class_weights, train_images or [], unet.num_classes + boundary)
    tile = training_tile_size(data.tile_size, unet.depth, unet.padding)
    return Plan(
        image_channels=unet.image_channels,
        num_classes=unet.num_classes,
        boundary_class=boundary,
        mask_reading="instances" if record["instance_data"] else "classes",
        class_weights=None if weights is None else tuple(float(weight) for weight in weights),
        tile_size=tile,
        output_size=output_size(tile, unet.depth, unet.padding),
        predict_tile_size=DEFAULT_PREDICT_TILE[unet.padding],
        threshold=float(state.get("threshold", 0.5)),
        threshold_source="calibrated" if "threshold" in state else "uncalibrated",
        learnt_object_size=record["learnt_size"],
        min_object_size=record["learnt_size"] if record["instance_data"] else 0,
        fill_holes=record["instance_data"],
    )
