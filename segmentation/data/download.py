"""Getting the public data sets: ``python dataset.py download {pennfudan,isbi2012} [--to DIR]``.

``dataset.py``'s command line hands over to ``download_main``. Standard library and tqdm only.

* Penn-Fudan pedestrians: downloaded from the official address, extracted safely (no path traversal,
  no symlinks, no zip bombs, nothing existing overwritten), then its layout is checked.
* ISBI 2012 (neuronal membranes): needs a registration on the challenge website, so the command only
  says where to put the files and checks whether they are there.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import shlex
import shutil
import stat
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from segmentation.config import UserError

PENNFUDAN_URL = "https://www.cis.upenn.edu/~jshi/ped_html/PennFudanPed.zip"

DEFAULT_MAX_EXTRACT_BYTES = 2 * 1024**3  # 2 GiB: Penn-Fudan is about 53 MB uncompressed
CHUNK_BYTES = 1 << 16
REDOWNLOAD = "delete it and download it again"  # what to do with a corrupt archive

ISBI2012_HELP = """\
ISBI 2012 (segmentation of neuronal structures in EM stacks) cannot be downloaded automatically:
the challenge data is handed out after registering on the ISBI 2012 challenge website.
Get the training data there and put it into one folder, the one given as train.data (e.g. data/isbi2012/):

  train-volume.tif   30 x 512 x 512 uint8 multi-page TIFF, the EM slices
  train-labels.tif   30 x 512 x 512 uint8 multi-page TIFF, 255 = cell interior, 0 = membrane
  test-volume.tif    optional: the 30 test slices (no labels)

or, instead of the two stacks, a folder pair of slices with the same names (PNG or TIFF):

  images/            the EM slices
  labels/            their labels (255 = cell interior, 0 = membrane)

Then train with: python training.py train.dataset_name=isbi2012 train.data=data/isbi2012"""


def _one_line(text: object) -> str:
    """``text`` as one line (messages of UserError are printed as one line)."""
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------------------------------


def download(url: str, destination: Path, show_progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``destination`` and return ``destination``.

    Skipped (with a notice) when ``destination`` already exists. The data is streamed to
    ``destination.with_suffix(".part")`` and renamed to ``destination`` only once complete, so an
    interrupted download never leaves a truncated file under the final name (the .part file is removed).
    ``timeout``: seconds without an answer from the server before giving up.

    Raises UserError (one line naming the URL and where to put a copy downloaded by hand) when the
    download fails, and UserError when the file cannot be written.
    """
    destination = Path(destination)
    if destination.exists():
        print(f"{destination} already exists, not downloading it again (delete it to download it again)")
        return destination
    part = destination.with_suffix(".part")
    by_hand = f"download it by hand (e.g. in a web browser) and save it as {destination}, then run this command again"
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the folder {destination.parent}: {_one_line(error)}") from None
    print(f"downloading {url} to {destination}")
    complete = False
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "unet-pytorch-downloader"})
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except (
            urllib.error.URLError,
            http.client.HTTPException,
            OSError,
            ValueError,
        ) as error:  # HTTPError, refused, DNS, timeout, SSL, bad URL
            raise UserError(f"could not download {url}: {_describe_network_error(error)}; {by_hand}") from None
        with response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            progress = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=destination.name,
                file=sys.stderr,
                disable=not show_progress,
            )
            received = 0
            try:
                with open(part, "wb") as file:
                    while True:
                        try:
                            chunk = response.read(CHUNK_BYTES)
                        except (
                            http.client.HTTPException,
                            OSError,
                            ValueError,
                            EOFError,
                        ) as error:  # reset, timeout, IncompleteRead
                            raise UserError(
                                f"could not download {url}: connection lost after {received} bytes "
                                f"({_describe_network_error(error)}); {by_hand}"
                            ) from None
                        if not chunk:
                            break
                        file.write(chunk)
                        received += len(chunk)
                        progress.update(len(chunk))
            except OSError as error:
                raise UserError(f"cannot write {part}: {_one_line(error)}") from None
            finally:
                progress.close()
        if total is not None and received != total:
            raise UserError(
                f"could not download {url}: got {received} of {total} bytes (connection closed early); {by_hand}"
            )
        try:
            os.replace(part, destination)
        except OSError as error:
            raise UserError(f"cannot rename {part} to {destination}: {_one_line(error)}") from None
        complete = True
    finally:
        if not complete:
            with contextlib.suppress(OSError):
                part.unlink()
    return destination


def _describe_network_error(error: BaseException) -> str:
    """A short, one-line reason for a failed download."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {_one_line(error.reason)}"
    if isinstance(error, urllib.error.URLError):
        reason = error.reason
        if isinstance(reason, BaseException):
            text = _one_line(reason) or type(reason).__name__
            return text if type(reason).__name__ in text else f"{type(reason).__name__}: {text}"
        return _one_line(reason)
    text = _one_line(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# ---------------------------------------------------------------------------------------------------
# Safe extraction
# ---------------------------------------------------------------------------------------------------


def _member_problem(name: str, info: zipfile.ZipInfo) -> str | None:
    """Why the member ``name`` must not be extracted, or None. Backslashes count as separators."""
    path = name.replace("\\", "/")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if "\x00" in name:
        return "has a NUL character in its name"
    if path.startswith("/"):
        return "has an absolute path"
    if re.match(r"^[A-Za-z]:", path):
        return "starts with a drive letter"
    if ".." in path.split("/"):
        return "has a '..' component"
    if not [part for part in path.split("/") if part not in ("", ".")]:
        return "has an empty name"
    return None


def _same_content(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> bool:
    """Whether the existing file ``path`` holds exactly the bytes of the member ``info``."""
    if path.stat().st_size != info.file_size:
        return False
    with zf.open(info) as member, open(path, "rb") as file:
        while True:
            a, b = member.read(CHUNK_BYTES), file.read(CHUNK_BYTES)
            if a != b:
                return False
            if not a:
                return True


def safe_extract_zip(archive: Path, target: Path, max_total_bytes: int = DEFAULT_MAX_EXTRACT_BYTES) -> list[Path]:
    """Extract every member of the zip ``archive`` under the folder ``target``; return the file paths.

    Everything is checked before anything is written. Refused with a UserError naming the archive
    (and the member): absolute paths, drive letters, ``..`` components, symbolic links, members that
    would land outside ``target`` (also through an existing symlink inside it), duplicate names, a
    total uncompressed size over ``max_total_bytes`` (zip bomb guard), a corrupt or non-zip file
    (CRCs are verified first), and a member whose destination already exists with other content (the
    user is told to move it away). Existing files with the same content are left as they are.

    Returns the paths (under ``target``) of all regular-file members, written now or already there.
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise UserError(f"{archive}: archive not found")
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as error:
        raise UserError(
            f"{archive}: not a valid zip archive ({_one_line(error) or type(error).__name__}; corrupt or "
            f"incomplete download?): {REDOWNLOAD}"
        ) from None
    with zf:
        plan = _extraction_plan(zf, archive, target, max_total_bytes)
        skip = _unchanged_members(zf, archive, target, plan)
        return _write_members(zf, archive, plan, skip)


def _extraction_plan(
    zf: zipfile.ZipFile, archive: Path, target: Path, max_total_bytes: int
) -> list[tuple[zipfile.ZipInfo, Path]]:
    """Each member with its destination under ``target``, after checking every member's name and the
    archive's total size and CRCs; a UserError at the first problem."""
    root = target.resolve()
    plan: list[tuple[zipfile.ZipInfo, Path]] = []
    seen: dict[str, bool] = {}  # normalised member name -> is a folder
    folders: set[str] = set()  # every folder that the members so far lie in
    total = 0
    for info in zf.infolist():
        problem = _member_problem(info.filename, info)
        if problem is None:
            parts = [part for part in info.filename.replace("\\", "/").split("/") if part not in ("", ".")]
            key = "/".join(parts)
            destination = root.joinpath(*parts).resolve()
            if destination == root or root not in destination.parents:
                problem = f"would be written outside {target}"
            elif key in seen and not (seen[key] and info.is_dir()):
                problem = "appears twice in the archive"
            elif any(seen.get("/".join(parts[:i])) is False for i in range(1, len(parts))):
                problem = "lies inside another member that is a file"
            elif not info.is_dir() and key in folders:
                problem = "is a file, but other members lie inside it"
        if problem is not None:
            raise UserError(
                f"{archive}: refusing to extract the member {info.filename!r}: it {problem} (unsafe archive; "
                "nothing was extracted)"
            )
        seen[key] = info.is_dir()
        folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
        if not info.is_dir():
            total += info.file_size
        plan.append((info, target.joinpath(*parts)))
    if total > max_total_bytes:
        raise UserError(
            f"{archive}: refusing to extract: its members total {total:,} bytes uncompressed, over the limit of "
            f"{max_total_bytes:,} bytes (zip bomb?)"
        )
    try:
        bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as error:
        raise UserError(
            f"{archive}: corrupt zip archive ({_one_line(error) or type(error).__name__}): {REDOWNLOAD}"
        ) from None
    if bad is not None:
        raise UserError(f"{archive}: corrupt zip archive (bad CRC of the member {bad!r}): {REDOWNLOAD}")
    return plan


def _unchanged_members(
    zf: zipfile.ZipFile, archive: Path, target: Path, plan: list[tuple[zipfile.ZipInfo, Path]]
) -> set[str]:
    """The names of the file members already extracted with the same content (to skip); a UserError
    when a destination exists with other content or a file stands where a folder must go."""
    if target.exists() and not target.is_dir():
        raise UserError(f"{target}: exists and is not a folder; cannot extract {archive} into it")
    skip: set[str] = set()
    for info, destination in plan:
        if info.is_dir():
            if destination.exists() and not destination.is_dir():
                raise UserError(
                    f"{archive}: the folder {info.filename!r} would replace the file {destination}: move that "
                    "file away and run again"
                )
            continue
        for parent in destination.parents:
            if parent == target:
                break
            if parent.exists() and not parent.is_dir():
                raise UserError(
                    f"{archive}: the member {info.filename!r} needs the folder {parent}, which is a file: move "
                    "that file away and run again"
                )
        if destination.is_dir():
            raise UserError(
                f"{archive}: the member {info.filename!r} would replace the folder {destination}: move that "
                "folder away and run again"
            )
        if destination.exists() or destination.is_symlink():
            try:
                same = destination.is_file() and _same_content(zf, info, destination)
            except OSError as error:
                raise UserError(f"cannot read {destination}: {_one_line(error)}") from None
            if not same:
                raise UserError(
                    f"{destination} already exists with other content than {info.filename!r} in {archive}: move "
                    "it away (or delete it) and run again"
                )
            skip.add(info.filename)
    return skip


def _write_members(
    zf: zipfile.ZipFile, archive: Path, plan: list[tuple[zipfile.ZipInfo, Path]], skip: set[str]
) -> list[Path]:
    """Write the planned members: every file through a temporary file in its folder, renamed once
    complete; returns the paths of all file members."""
    files: list[Path] = []
    for info, destination in plan:
        try:
            if info.is_dir():
                destination.mkdir(parents=True, exist_ok=True)
                continue
            files.append(destination)
            if info.filename in skip:
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            temporary = destination.with_name(f".{destination.name}.{os.getpid()}.extracting")
            try:
                with open(temporary, "wb") as file, zf.open(info) as member:  # mode from the umask, like any new file
                    shutil.copyfileobj(member, file, CHUNK_BYTES)
                os.replace(temporary, destination)
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise
        except zipfile.BadZipFile as error:
            raise UserError(f"{archive}: corrupt zip archive ({_one_line(error)}): {REDOWNLOAD}") from None
        except OSError as error:
            raise UserError(
                f"cannot extract {info.filename!r} from {archive} to {destination}: {_one_line(error)}"
            ) from None
    return files


# ---------------------------------------------------------------------------------------------------
# Checks of the extracted data
# ---------------------------------------------------------------------------------------------------


def check_pennfudan(root: Path) -> dict:
    """Check the official Penn-Fudan layout under ``root``; return ``{"images", "masks", "pairs"}`` counts.

    Expects ``root/PNGImages/<stem>.png`` and, for every image, ``root/PedMasks/<stem>_mask.png``.
    Raises a one-line UserError naming what is missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: Penn-Fudan folder not found (python dataset.py download pennfudan gets it)")
    images_dir, masks_dir = root / "PNGImages", root / "PedMasks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise UserError(
                f"{folder}: folder missing; not the Penn-Fudan layout (expected PNGImages/ and PedMasks/ in {root})"
            )
    images = sorted(path for path in images_dir.glob("*.png") if path.is_file())
    masks = sorted(path for path in masks_dir.glob("*_mask.png") if path.is_file())
    if not images:
        raise UserError(f"{images_dir}: no .png images")
    mask_names = {path.name for path in masks}
    missing = [f"{image.stem}_mask.png" for image in images if f"{image.stem}_mask.png" not in mask_names]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(f"{masks_dir}: {len(missing)} of {len(images)} images have no mask: {shown} missing")
    return {"images": len(images), "masks": len(masks), "pairs": len(images)}


# ---------------------------------------------------------------------------------------------------
# Command line: python dataset.py download {pennfudan,isbi2012} [--to DIR]
# ---------------------------------------------------------------------------------------------------


def _config_hint(name: str, data: Path) -> str:
    return f"python training.py train.dataset_name={name} {shlex.quote(f'train.data={data.as_posix()}')}"


def _download_pennfudan(folder: Path, show_progress: bool) -> None:
    root = folder / "PennFudanPed"
    try:
        counts = check_pennfudan(root)
        print(f"{root} is already there")
    except UserError:
        archive = download(PENNFUDAN_URL, folder / "PennFudanPed.zip", show_progress=show_progress)
        print(f"extracting {archive} into {folder}")
        safe_extract_zip(archive, folder)
        counts = check_pennfudan(root)
        print(f"{archive} can be deleted now")
    print(f"Penn-Fudan: {counts['pairs']} images with their masks in {root}")
    print(f"config lines: train.dataset_name=pennfudan train.data={root.as_posix()}; train with:")
    print(f"  {_config_hint('pennfudan', root)}")
    print("  (the images are RGB: add unet.image_channels=3 to train on colour instead of gray)")


def _download_isbi2012(folder: Path) -> None:
    print(ISBI2012_HELP)
    root = folder / "isbi2012"
    stacks = [root / "train-volume.tif", root / "train-labels.tif"]
    if all(path.is_file() for path in stacks):
        print(f"\nfound {stacks[0]} and {stacks[1]}: ready, train with")
        print(f"  {_config_hint('isbi2012', root)}")
    else:
        print(f"\nnot found yet: {' and '.join(str(path) for path in stacks if not path.is_file())}")


def download_main(argv: list[str]) -> int:
    """``python dataset.py download {pennfudan,isbi2012} [--to DIR]``; returns the exit status.

    ``argv`` are the arguments after the script name, with or without the leading ``download``.
    A UserError is printed as ``error: ...`` (one line) on stderr and gives 1; bad arguments give 2.
    """
    argv = list(argv)
    if argv and argv[0] == "download":
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="python dataset.py download", description="Get a public data set for training."
    )
    parser.add_argument(
        "dataset",
        choices=("pennfudan", "isbi2012"),
        help="pennfudan: downloaded and extracted; isbi2012: instructions (needs a registration)",
    )
    parser.add_argument("--to", default="data", metavar="DIR", help="folder for the data (default: data/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or bad arguments (argparse has printed the usage)
        return exit_.code if isinstance(exit_.code, int) else 2
    folder = Path(args.to)
    try:
        if args.dataset == "pennfudan":
            _download_pennfudan(folder, show_progress=not args.no_progress)
        else:
            _download_isbi2012(folder)
    except UserError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0
