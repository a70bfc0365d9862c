"""A data set's fingerprint before training: its images, sizes, channels, masks, classes and the config lines to use.

    python dataset.py check PATH [--sample 200]

Like nnU-Net's fingerprint, but without a preprocessing run: sizes come from every image's header,
mask values and class fractions from up to ``--sample`` pairs spread over the data set, so a folder
of thousands of images is checked in seconds. Problems (images without a mask, masks without an
image, files that cannot be read, masks whose values no setting maps to classes) are listed, not
raised one at a time.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from losses import IGNORE_LABEL
from model import output_size
from segmentation.config import UserError, auto_tile_size, load_config
from segmentation.data.images import ImageLayout, image_layout, layout_image, tiff_spacing
from segmentation.data.readers import (
    ISBI_SPACING,
    FileSample,
    MaskSettings,
    label_from_mask,
    listed,
    match_by_stem,
    pair_samples,
    read_isbi2012,
    read_pennfudan,
    size_mismatch,
)
from segmentation.geometry import volume_tile
from segmentation.settings import UNetSettings

LARGE_PHOTO_SIDE = 1000  # px: longer sides than this suggest train.image_scale
MAX_CLASSES = 10  # integer masks with more distinct values than this hold object ids, not classes
SHOWN_IMAGES = 12  # images whose annotated fraction the report names one by one


def check_main(argv: list[str]) -> int:
    """``python dataset.py check PATH``: print the fingerprint; exit status 0, or 1 when the data
    cannot be trained on as it is."""
    argv = argv[1:] if argv and argv[0] == "check" else argv
    parser = argparse.ArgumentParser(
        prog="python dataset.py check", description="Check a data set and suggest its config lines."
    )
    parser.add_argument("path", type=Path, help="the data set's folder (images/ + masks/, ISBI 2012, Penn-Fudan)")
    parser.add_argument(
        "--sample", type=int, default=200, help="masks to read at most, spread over the data set (default 200)"
    )
    parser.add_argument(
        "--ignore-value",
        type=float,
        help="the mask value of unannotated pixels (train.ignore_value), if you know it; else it is suggested",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        report = check_data(args.path, args.sample, args.ignore_value)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("\n".join(report["lines"]))
    return 1 if report["problems"] else 0


def detect_layout(root: Path) -> str:
    """``isbi2012``, ``pennfudan`` or ``folder`` from the files under ``root``; a UserError otherwise."""
    if (root / "train-volume.tif").is_file() or (root / "labels").is_dir() or (root / "train" / "labels").is_dir():
        return "isbi2012"
    if any((root / name).is_dir() for name in ("PNGImages", "PennFudanPed", "train_images")):
        return "pennfudan"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "folder"
    if not root.is_dir():
        raise UserError(f"{root}: folder not found")
    raise UserError(
        f"{root}: no known layout: expected images/ + masks/ (your data), train-volume.tif + train-labels.tif "
        "(ISBI 2012) or PNGImages/ + PedMasks/ (Penn-Fudan)"
    )


def list_pairs(root: Path, layout: str) -> tuple[list[FileSample], list[str]]:
    """The data set's samples (a TIFF stack: one per image, as training lists them) and its pairing problems
    (all of them, for a folder, as training would refuse them one at a time)."""
    if layout == "isbi2012":
        return read_isbi2012(root), []
    if layout == "pennfudan":
        samples, val = read_pennfudan(root)
        return samples + (val or []), []
    pairs, problems, lonely_masks = match_by_stem(root / "images", root / "masks")
    problems += [f"{mask}: a mask without an image" for mask in lonely_masks]
    samples = []
    for image, mask in pairs:
        try:
            samples += pair_samples(image, mask)[0]
        except UserError as error:  # a file over train.max_image_pixels, a mask stack unlike its image's
            problems.append(str(error))
    return samples, problems


def read_headers(samples: list[FileSample]) -> tuple[list[tuple], list[str], dict[Path, ImageLayout]]:
    """``(headers, problems, layouts)``: each readable image's ``((width, height), channels, dtype)``
    and the lines of the files that training would refuse from their headers (unreadable, over
    ``train.max_image_pixels``, a mask whose size differs from its image's), without decoding pixels;
    ``layouts``: the files' ``ImageLayout``s by path."""
    layouts: dict[Path, ImageLayout | str] = {}

    def layout_of(path: Path) -> ImageLayout | str:
        if path not in layouts:
            try:
                layouts[path] = image_layout(path)
            except UserError as error:
                layouts[path] = str(error)
        return layouts[path]

    headers, problems = [], []
    for sample in samples:
        image, mask = layout_of(sample.image), layout_of(sample.mask)
        for found in (image, mask):
            if isinstance(found, str) and found not in problems:
                problems.append(found)
        if isinstance(image, ImageLayout):
            index = sample.page or 0
            headers.append((image.sizes[index], image.channels[index], image.dtype))
            if isinstance(mask, ImageLayout) and (problem := size_mismatch(image, mask, sample.page, sample.name)):
                problems.append(problem)
    return headers, problems, {path: found for path, found in layouts.items() if isinstance(found, ImageLayout)}


def mask_kind(mask: np.ndarray, palette: bool) -> str:
    """How a mask's values look: ``0/255``, ``0/1``, ``float 0/1``, ``palette indices``, ``colours``,
    ``integer values`` (class indices or object ids) or ``other values``."""
    if (
        mask.ndim == 3
        and mask.shape[-1] in (3, 4)
        and not (np.array_equal(mask[..., 0], mask[..., 1]) and np.array_equal(mask[..., 0], mask[..., 2]))
    ):
        return "colours"
    values = set(np.unique(mask[..., 0] if mask.ndim == 3 else mask).tolist())
    if palette:
        return "palette indices"
    if values <= {0, 255} and 255 in values:
        return "0/255"
    if values <= {0, 1}:
        return "float 0/1" if np.issubdtype(mask.dtype, np.floating) else "0/1"
    return "integer values" if all(float(value).is_integer() and value >= 0 for value in values) else "other values"


def check_data(root: Path, sample_size: int = 200, ignore_value: float | None = None) -> dict:
    """The fingerprint of the data set at ``root``: ``lines`` to print and the ``problems`` found; masks read
    with ``ignore_value`` (``train.ignore_value``) as unannotated where given, else where it looks so."""
    layout = detect_layout(root)
    samples, problems = list_pairs(root, layout)
    if not samples:
        raise UserError(f"{root}: no image with a mask: {problems[0] if problems else 'empty'}")
    headers, unreadable, layouts = read_headers(samples)
    picked = [
        samples[index] for index in np.linspace(0, len(samples) - 1, min(sample_size, len(samples))).round().astype(int)
    ]
    masks, kinds = [], Counter()
    for sample in picked:
        if sample.mask not in layouts:  # named among the problems
            continue
        image = layouts.get(sample.image)
        if image is not None and image.dtype.startswith("float"):  # NaN shows in the pixels alone
            try:
                layout_image(image, sample.page)
            except UserError as error:
                unreadable.append(str(error))
        try:
            mask = layout_image(layouts[sample.mask], sample.page, palette=True)
        except UserError as error:
            unreadable.append(str(error))
            continue
        palette = layouts[sample.mask].palette
        kind = mask_kind(mask, palette)
        kinds[kind] += 1
        # compared with the other masks by its values: a palette of 0/1 is as binary as a 0/1 gray mask
        masks.append((sample, mask, mask_kind(mask, False) if palette else kind))
    suggestion = suggest(layout, root, headers, masks, kinds, ignore_value)
    lines = describe(layout, root, samples, headers, masks, kinds, suggestion)
    lines += volume_lines(root, layout, sorted({sample.image for sample in samples}), layouts)
    problems += unreadable + suggestion["problems"]
    lines += [f"problem: {problem}" for problem in problems[:20]] + (
        [f"... and {len(problems) - 20} more problems"] if len(problems) > 20 else []
    )
    lines += [
        "",
        "suggested config (python training.py --config this.yaml, or as section.key=value overrides):",
        *suggestion["yaml"],
    ]
    return {"lines": lines, "problems": problems, "suggestion": suggestion}


def suggest(
    layout: str, root: Path, headers: list, masks: list, kinds: Counter, ignore_value: float | None = None
) -> dict:
    """The config that reads these masks and images: ``values`` (``section.key`` -> value), its
    ``yaml`` lines, the class ``fractions`` under it (of the annotated pixels), the ``annotated`` fraction of
    each sampled mask, and the masks it cannot read or that differ from the rest (``problems``)."""
    values: dict[str, object] = {"train.dataset_name": layout, "train.data": str(root)}
    channels = Counter(count for _, count, _ in headers)
    values["unet.image_channels"] = 3 if channels[3] + channels[4] > channels[1] + channels[2] else 1
    problems = []
    if ignore_value is None and layout == "folder" and masks:
        ignore_value = unlabelled_value(masks, kinds)
    if ignore_value is not None:
        values["train.ignore_value"] = int(ignore_value) if float(ignore_value).is_integer() else ignore_value
        masks = [
            (sample, mask, kind if kind != "integer values" else annotated_kind(mask, ignore_value))
            for sample, mask, kind in masks
        ]
        kinds = Counter(kind for _, _, kind in masks)
    if layout == "folder" and masks:
        values.update(mask_config(masks, kinds, ignore_value))
        usual = kinds.most_common(1)[0][0]
        binary = {"0/255", "0/1", "float 0/1"}
        problems += [
            f"{sample.mask}: values {listed(np.unique(mask).tolist())} unlike most masks ({usual})"
            for sample, mask, kind in masks
            if kind != usual and not (usual in binary and kind in binary) and usual != "palette indices"
        ]
    sides = [max(size) for size, _, _ in headers]
    if sides and np.median(sides) > LARGE_PHOTO_SIDE:
        values["train.image_scale"] = round(512 / float(np.median(sides)), 2)
    config = load_config(
        None, [f"{key}={value}" for key, value in values.items() if key != "train.data"] + [f"train.data={root}"]
    )
    settings = MaskSettings.from_settings(config.unet.num_classes, config.data)
    fractions, annotated, unreadable = class_fractions(masks, settings)
    if len(fractions) and fractions.min() < 0.1:
        values["train.class_weights"] = "balanced"
    sections: dict[str, list[str]] = {}
    for key, value in values.items():
        section, _, name = key.partition(".")
        sections.setdefault(section, []).append(f"  {name}: {value}")
    yaml = [
        line for section in ("unet", "train") if section in sections for line in (f"{section}:", *sections[section])
    ]
    unet = config.unet
    tile = auto_tile_size(unet.depth, unet.padding) if config.data.tile_size == "auto" else config.data.tile_size
    labelled = output_size(tile, config.unet.depth, config.unet.padding)
    return {
        "values": values,
        "yaml": yaml,
        "fractions": fractions,
        "annotated": annotated,
        "problems": problems + unreadable,
        "tile": (tile, labelled),
    }


def unlabelled_value(masks: list, kinds: Counter) -> float | None:
    """The mask value that looks like "not annotated", or None: a third value between the 0 and 255 of
    two-class masks that covers most pixels (128 in 0/128/255 scribbles; a class that covers a third of them
    is a class), or 255 beside a few small class indices (as VOC's masks mark what nobody labelled)."""
    if kinds.most_common(1)[0][0] not in ("integer values", "palette indices"):
        return None
    gray = [mask for _, mask, _ in masks if mask.ndim == 2]
    distinct = sorted(set().union(*(set(np.unique(mask).tolist()) for mask in gray)))
    if len(distinct) == 3 and distinct[0] == 0 and distinct[-1] == 255:
        middle = distinct[1]
        covered = sum(np.count_nonzero(mask == middle) for mask in gray) / sum(mask.size for mask in gray)
        return middle if covered > 0.5 else None
    small = [value for value in distinct if value != 255]
    if 255 in distinct and small and small == list(range(len(small))) and len(small) <= MAX_CLASSES:
        return 255
    return None


def annotated_kind(mask: np.ndarray, ignore_value: float) -> str:
    """``mask_kind`` of a gray mask's annotated pixels (the ones not of ``ignore_value``)."""
    annotated = mask[mask != ignore_value]
    return mask_kind(annotated.reshape(1, -1), False) if annotated.size else "integer values"


def mask_config(masks: list, kinds: Counter, ignore_value: float | None = None) -> dict:
    """The ``unet.num_classes`` and mask keys that read a folder's masks, from their usual kind:
    colours -> ``mask_colors``; many or sparse integers -> instance ids; a few small integers or
    palette indices -> class indices; other values -> ``mask_values``; 0/1 and 0/255 -> two classes.
    Values of ``ignore_value`` (unannotated pixels) count as none of them."""
    usual = kinds.most_common(1)[0][0]
    typical = [mask for _, mask, kind in masks if kind == usual or usual == "palette indices"]
    if ignore_value is not None:
        typical = [mask[mask != ignore_value] if mask.ndim == 2 else mask for mask in typical]
    if usual == "colours":
        colours = sorted(
            {tuple(colour) for mask in typical for colour in np.unique(mask[..., :3].reshape(-1, 3), axis=0).tolist()}
        )
        return {"unet.num_classes": len(colours), "train.mask_colors": [list(colour) for colour in colours]}
    distinct = sorted(set().union(*(set(np.unique(mask).tolist()) for mask in typical)))
    if usual == "integer values" and len(distinct) > MAX_CLASSES:
        return {"unet.num_classes": 2, "train.mask_type": "instances"}  # more values than classes: one id per object
    if usual == "palette indices" or (usual == "integer values" and distinct == list(range(len(distinct)))):
        return {"unet.num_classes": int(max(distinct)) + 1, "train.mask_type": "classes"}
    if usual in ("integer values", "other values"):
        return {"unet.num_classes": len(distinct), "train.mask_values": distinct}
    return {"unet.num_classes": 2}


def class_fractions(masks: list, settings: MaskSettings) -> tuple[np.ndarray, dict[str, float], list[str]]:
    """The fraction of each class over the annotated pixels of the sampled masks read as ``settings`` say,
    the annotated fraction of each mask (by name), and the masks they cannot read (one line each)."""
    counts, annotated, problems = np.zeros(settings.num_classes, dtype=np.int64), {}, []
    for sample, mask, _ in masks:
        try:
            label = label_from_mask(mask, settings, str(sample.mask), sample.mask_kind)[0]
        except UserError as error:
            problems.append(str(error))
            continue
        counts += np.bincount(label.ravel(), minlength=settings.num_classes)[: settings.num_classes]
        annotated[sample.name] = float(np.mean(label != IGNORE_LABEL))
    return (counts / counts.sum() if counts.sum() else counts.astype(float)), annotated, problems


def describe(
    layout: str, root: Path, samples: list, headers: list, masks: list, kinds: Counter, suggestion: dict
) -> list[str]:
    """The report's lines: counts, sizes, channels and bit depths, mask kinds, class fractions."""
    sizes = Counter(size for size, _, _ in headers)
    channels = Counter(count for _, count, _ in headers)
    depths = Counter(dtype for _, _, dtype in headers)
    widths, heights = [size[0] for size in sizes], [size[1] for size in sizes]
    (width, height), _ = sizes.most_common(1)[0] if headers else ((0, 0), 0)
    lines = [
        f"{root}: {layout} layout, {len(samples)} images with masks",
        f"sizes: {len(sizes)} different, {min(widths)}-{max(widths)} x {min(heights)}-{max(heights)} px (width "
        f"x height); most common {width}x{height}"
        if headers
        else "sizes: none readable",
        f"channels: {', '.join(f'{count} with {channel}' for channel, count in sorted(channels.items()))}; pixel "
        f"types: {', '.join(f'{count} {dtype}' for dtype, count in depths.most_common())}",
        f"masks (read {len(masks)} of {len(samples)}): "
        + ", ".join(f"{count} {kind}" for kind, count in kinds.most_common()),
    ]
    values = (
        sorted(set().union(*(set(np.unique(mask).tolist()) for _, mask, _ in masks if mask.ndim == 2))) if masks else []
    )
    if values:
        lines.append(f"mask values: {listed(values, 12)}")
    if suggestion["values"].get("train.mask_type") == "classes" and layout == "folder":
        lines.append(
            "masks hold a few small integers: read as class indices; if each value is an object instead, use "
            "train.mask_type: instances and unet.num_classes: 2"
        )
    tile, labelled = suggestion["tile"]
    lines.append(f"tiles: train.tile_size auto gives {tile} px ({labelled} px labelled output) for the default U-Net")
    if len(suggestion["fractions"]):
        lines.append(
            "class fractions (as the suggested config reads the masks): "
            + ", ".join(f"{c}: {100 * f:.1f} %" for c, f in enumerate(suggestion["fractions"]))
        )
    ignore_value = suggestion["values"].get("train.ignore_value")
    if ignore_value is not None:
        lines += annotated_lines(suggestion["annotated"], ignore_value)
    return lines


def volume_lines(root: Path, layout: str, images: list[Path], layouts: dict[Path, ImageLayout]) -> list[str]:
    """For the TIFF stacks among ``images``: how ``unet.dims: 3`` reads them (each a volume), their sizes and
    voxel spacing (the files' metadata; ISBI 2012's known one), and the 3D tile the plan would pick for the
    default U-Net; none for a data set without stacks."""
    stacks = [layouts[path] for path in images if path in layouts and layouts[path].count > 1]
    if not stacks:
        return []
    lines = [f"volumes: {len(stacks)} TIFF stack(s); with unet.dims: 3 each is a volume (z, y, x):"]
    spacings = []
    for stack in stacks[:8]:
        width, height = stack.sizes[0]
        spacing = tiff_spacing(stack.path) or (ISBI_SPACING if layout == "isbi2012" else None)
        spacings.append(spacing)
        stated = f"spacing {spacing}" if spacing else "no spacing in its metadata (set train.spacing: [z, y, x])"
        lines.append(f"  {stack.path.name}: {stack.count} x {height} x {width} voxels, {stated}")
    if len(stacks) > 8:
        lines.append(f"  ... and {len(stacks) - 8} more")
    spacing = next((found for found in spacings if found), (1.0, 1.0, 1.0))
    largest = [max(stack.count for stack in stacks), *(max(max(stack.sizes[0]) for stack in stacks),) * 2]
    defaults = UNetSettings()
    tile, kernels, pools = volume_tile(spacing, defaults.depth, defaults.padding, None, None, largest)
    lines.append(
        f"3D tiles: train.tile_depth and tile_size auto give {tile[0]} x {tile[1]} x {tile[2]} voxels for the default "
        f"U-Net at spacing {spacing}, pooling z at {sum(pool[0] == 2 for pool in pools)} of {len(pools)} levels"
    )
    return lines


def annotated_lines(annotated: dict[str, float], ignore_value: float) -> list[str]:
    """The annotated fraction overall and per image (the first ``SHOWN_IMAGES``) of the sampled masks."""
    if not annotated:
        return []
    fractions = list(annotated.values())
    shown = ", ".join(f"{name} {100 * fraction:.1f} %" for name, fraction in list(annotated.items())[:SHOWN_IMAGES])
    more = f" and {len(annotated) - SHOWN_IMAGES} more" if len(annotated) > SHOWN_IMAGES else ""
    empty = sum(fraction == 0 for fraction in fractions)
    left_out = f"; {empty} with nothing annotated, which training leaves out" if empty else ""
    return [
        f"annotated pixels (value {ignore_value:g} marks the others: train.ignore_value): "
        f"{100 * np.mean(fractions):.1f} % of the pixels, {100 * min(fractions):.1f}-{100 * max(fractions):.1f} % "
        f"per image{left_out}",
        f"per image: {shown}{more}",
        f"(if {ignore_value:g} is a class rather than pixels nobody annotated, drop train.ignore_value and map it with "
        "train.mask_values)",
    ]
