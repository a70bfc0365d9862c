"""Tests of the data download command: safe zip extraction, the Penn-Fudan layout check, download().

No network: archives are built here, downloads read file:// URLs or a fake urlopen.
"""

import io
import time
import urllib.request
import uuid
import zipfile
from pathlib import Path

import pytest

from segmentation.config import UserError
from segmentation.data import download as dl
from segmentation.data.download import ISBI2012_HELP, check_pennfudan, download, download_main, safe_extract_zip


def make_zip(path: Path, members: dict, compression=zipfile.ZIP_DEFLATED) -> Path:
    """A zip at ``path`` of ``{name: bytes}``; a name ending in / is a folder entry."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def files_under(folder: Path) -> dict:
    """``{relative posix path: bytes}`` of every file under ``folder`` (empty when it does not exist)."""
    if not folder.exists():
        return {}
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file() or p.is_symlink()
    }


GOOD = {
    "top/": b"",
    "top/readme.txt": b"hello\n",
    "top/a/b/c/deep.bin": bytes(range(256)) * 40,
    "top/a/empty.dat": b"",
    "other.txt": b"x" * 1000,
}


# ---------------------------------------------------------------------------------------------------
# safe_extract_zip
# ---------------------------------------------------------------------------------------------------


def test_good_zip_extracts_exactly_its_files(tmp_path):
    archive = make_zip(tmp_path / "good.zip", GOOD)
    target = tmp_path / "out"
    returned = safe_extract_zip(archive, target)
    expected = {name: data for name, data in GOOD.items() if not name.endswith("/")}
    assert files_under(target) == expected
    assert sorted(p.relative_to(target).as_posix() for p in returned) == sorted(expected)
    assert all(p.is_absolute() == target.is_absolute() for p in returned)


def test_extracting_again_skips_identical_files(tmp_path):
    archive = make_zip(tmp_path / "good.zip", GOOD)
    target = tmp_path / "out"
    safe_extract_zip(archive, target)
    deep = target / "top/a/b/c/deep.bin"
    before = deep.stat().st_mtime_ns
    time.sleep(0.01)
    returned = safe_extract_zip(archive, target)
    assert len(returned) == 4
    assert deep.stat().st_mtime_ns == before  # not rewritten
    assert files_under(target) == {n: d for n, d in GOOD.items() if not n.endswith("/")}


def _assert_refused_and_nothing_written(tmp_path, members, words, **kwargs):
    archive = make_zip(tmp_path / "bad.zip", members)
    target = tmp_path / "out" / "inner"
    with pytest.raises(UserError) as caught:
        safe_extract_zip(archive, target, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    assert str(archive) in message
    for word in words:
        assert word in message
    assert files_under(tmp_path / "out") == {}
    # the only file in tmp_path is the archive itself
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["bad.zip"]
    return message


def test_parent_traversal_member_is_refused(tmp_path):
    members = {"ok/good.txt": b"fine", "../evil.txt": b"evil"}
    _assert_refused_and_nothing_written(tmp_path, members, ["../evil.txt", ".."])
    assert not (tmp_path / "out" / "evil.txt").exists()


def test_any_parent_component_is_refused_even_inside_the_target(tmp_path):
    members = {"ok/good.txt": b"fine", "ok/../inside.txt": b"sneaky"}
    _assert_refused_and_nothing_written(tmp_path, members, ["ok/../inside.txt", "'..' component"])


def test_nested_parent_traversal_member_is_refused(tmp_path):
    members = {"ok/good.txt": b"fine", "ok/../../../evil.txt": b"evil"}
    _assert_refused_and_nothing_written(tmp_path, members, ["ok/../../../evil.txt"])


def test_absolute_member_is_refused(tmp_path):
    evil = Path(f"/tmp/evil-{uuid.uuid4().hex}.txt")
    members = {"ok/good.txt": b"fine", str(evil): b"evil"}
    try:
        _assert_refused_and_nothing_written(tmp_path, members, [evil.name, "absolute"])
        assert not evil.exists()
    finally:
        evil.unlink(missing_ok=True)


@pytest.mark.parametrize("name", ["C:\\evil.txt", "C:/evil.txt", "c:evil.txt"])
def test_drive_letter_member_is_refused(tmp_path, name):
    members = {"ok/good.txt": b"fine", name: b"evil"}
    _assert_refused_and_nothing_written(tmp_path, members, ["drive letter"])


def test_backslash_traversal_member_is_refused(tmp_path):
    members = {"ok/good.txt": b"fine", "..\\evil.txt": b"evil"}
    _assert_refused_and_nothing_written(tmp_path, members, [".."])


def test_symlink_member_is_refused(tmp_path):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok/good.txt", b"fine")
        link = zipfile.ZipInfo("ok/link")
        link.create_system = 3
        link.external_attr = 0o120777 << 16
        zf.writestr(link, "/etc/passwd")
    target = tmp_path / "out"
    with pytest.raises(UserError, match="symbolic link") as caught:
        safe_extract_zip(archive, target)
    assert "ok/link" in str(caught.value)
    assert files_under(target) == {}


def test_existing_symlink_inside_target_cannot_lead_outside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "out"
    target.mkdir()
    (target / "sub").symlink_to(outside, target_is_directory=True)
    archive = make_zip(tmp_path / "bad.zip", {"sub/evil.txt": b"evil"})
    with pytest.raises(UserError, match="outside"):
        safe_extract_zip(archive, target)
    assert not (outside / "evil.txt").exists()


def test_total_size_over_the_limit_is_refused(tmp_path):
    members = {"ok/a.bin": b"\0" * 600, "ok/b.bin": b"\0" * 600}  # compresses to a few bytes
    message = _assert_refused_and_nothing_written(tmp_path, members, ["1,200", "1,000"], max_total_bytes=1000)
    assert "limit" in message
    # the same archive is fine under a limit it fits
    safe_extract_zip(tmp_path / "bad.zip", tmp_path / "ok", max_total_bytes=1200)
    assert files_under(tmp_path / "ok") == members


@pytest.mark.parametrize("content", [b"this is not a zip file at all\n" * 10, b"", b"<html>Not Found</html>"])
def test_non_zip_file_is_refused(tmp_path, content):
    archive = tmp_path / "PennFudanPed.zip"
    archive.write_bytes(content)
    with pytest.raises(UserError, match="not a valid zip") as caught:
        safe_extract_zip(archive, tmp_path / "out")
    assert str(archive) in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_truncated_zip_is_refused(tmp_path):
    archive = make_zip(tmp_path / "good.zip", GOOD)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(UserError):
        safe_extract_zip(archive, tmp_path / "out")
    assert files_under(tmp_path / "out") == {}


def test_corrupt_member_data_is_refused_before_writing(tmp_path):
    archive = make_zip(tmp_path / "c.zip", {"a.txt": b"A" * 100, "b.txt": b"B" * 100}, compression=zipfile.ZIP_STORED)
    data = bytearray(archive.read_bytes())
    data[data.index(b"B" * 100) + 50] = ord("X")  # b.txt no longer matches its CRC
    archive.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt"):
        safe_extract_zip(archive, tmp_path / "out")
    assert files_under(tmp_path / "out") == {}  # not even a.txt


def test_existing_different_file_is_not_overwritten(tmp_path):
    archive = make_zip(tmp_path / "good.zip", GOOD)
    target = tmp_path / "out"
    (target / "top").mkdir(parents=True)
    (target / "top" / "readme.txt").write_bytes(b"my own notes")
    with pytest.raises(UserError, match="move it away") as caught:
        safe_extract_zip(archive, target)
    assert "readme.txt" in str(caught.value)
    assert (target / "top" / "readme.txt").read_bytes() == b"my own notes"
    assert files_under(target) == {"top/readme.txt": b"my own notes"}  # nothing else written either


def test_existing_same_size_different_file_is_not_overwritten(tmp_path):
    archive = make_zip(tmp_path / "good.zip", {"a.txt": b"abcdef"})
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_bytes(b"ABCDEF")
    with pytest.raises(UserError, match="move it away"):
        safe_extract_zip(archive, target)
    assert (target / "a.txt").read_bytes() == b"ABCDEF"


def test_duplicate_member_is_refused(tmp_path):
    archive = tmp_path / "dup.zip"
    with zipfile.ZipFile(archive, "w") as zf, pytest.warns(UserWarning):
        zf.writestr("a.txt", b"first")
        zf.writestr("a.txt", b"second")
    with pytest.raises(UserError, match="twice"):
        safe_extract_zip(archive, tmp_path / "out")
    assert files_under(tmp_path / "out") == {}


# ---------------------------------------------------------------------------------------------------
# check_pennfudan
# ---------------------------------------------------------------------------------------------------


STEMS = ["FudanPed00001", "FudanPed00002", "PennPed00001"]


def make_pennfudan(root: Path, stems=STEMS) -> Path:
    (root / "PNGImages").mkdir(parents=True)
    (root / "PedMasks").mkdir()
    for stem in stems:
        (root / "PNGImages" / f"{stem}.png").write_bytes(b"\x89PNG image")
        (root / "PedMasks" / f"{stem}_mask.png").write_bytes(b"\x89PNG mask")
    return root


def test_check_pennfudan_counts(tmp_path):
    root = make_pennfudan(tmp_path / "PennFudanPed")
    assert check_pennfudan(root) == {"images": 3, "masks": 3, "pairs": 3}


def test_check_pennfudan_names_a_missing_mask(tmp_path):
    root = make_pennfudan(tmp_path / "PennFudanPed")
    (root / "PedMasks" / "FudanPed00002_mask.png").unlink()
    with pytest.raises(UserError) as caught:
        check_pennfudan(root)
    message = str(caught.value)
    assert "FudanPed00002_mask.png" in message and "FudanPed00001_mask" not in message and "\n" not in message


@pytest.mark.parametrize("missing", ["PNGImages", "PedMasks"])
def test_check_pennfudan_names_a_missing_folder(tmp_path, missing):
    root = make_pennfudan(tmp_path / "PennFudanPed")
    for path in (root / missing).iterdir():
        path.unlink()
    (root / missing).rmdir()
    with pytest.raises(UserError, match=missing):
        check_pennfudan(root)


def test_check_pennfudan_without_images_or_folder(tmp_path):
    root = make_pennfudan(tmp_path / "PennFudanPed", stems=[])
    with pytest.raises(UserError, match="no .png"):
        check_pennfudan(root)
    with pytest.raises(UserError, match="not found"):
        check_pennfudan(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------
# download
# ---------------------------------------------------------------------------------------------------


def test_download_file_url_is_atomic(tmp_path):
    source = tmp_path / "source.bin"
    payload = bytes(range(256)) * 1000  # several chunks
    source.write_bytes(payload)
    destination = tmp_path / "data" / "PennFudanPed.zip"
    assert download(source.as_uri(), destination, show_progress=False) == destination
    assert destination.read_bytes() == payload
    assert not destination.with_suffix(".part").exists()
    assert [p.name for p in destination.parent.iterdir()] == ["PennFudanPed.zip"]


def test_download_shows_progress_on_stderr(tmp_path, capfd):
    source = tmp_path / "source.bin"
    source.write_bytes(b"z" * 200_000)
    download(source.as_uri(), tmp_path / "copy.bin", show_progress=True)
    assert "copy.bin" in capfd.readouterr().err


def test_download_writes_to_part_then_renames(tmp_path, monkeypatch):
    destination = tmp_path / "PennFudanPed.zip"
    seen = []

    class Watching(FakeResponse):
        def read(self, size=-1):
            seen.append((destination.exists(), destination.with_suffix(".part").exists()))
            return super().read(size)

    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: Watching(b"y" * 5000, 5000))
    download("https://example.invalid/PennFudanPed.zip", destination, show_progress=False)
    assert len(seen) > 2 and all(not final for final, _ in seen) and all(part for _, part in seen[1:])
    assert destination.read_bytes() == b"y" * 5000 and not destination.with_suffix(".part").exists()


def test_download_skips_an_existing_file(tmp_path, monkeypatch, capsys):
    destination = tmp_path / "PennFudanPed.zip"
    destination.write_bytes(b"already here")

    def no_network(*args, **kwargs):
        raise AssertionError("urlopen called although the file exists")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert download("https://example.invalid/x.zip", destination, show_progress=False) == destination
    assert destination.read_bytes() == b"already here"
    assert "already exists" in capsys.readouterr().out


def test_download_unreachable_url_raises_one_line_quickly(tmp_path):
    url = "http://127.0.0.1:9/x.zip"
    destination = tmp_path / "x.zip"
    start = time.monotonic()
    with pytest.raises(UserError) as caught:
        download(url, destination, show_progress=False, timeout=5)
    assert time.monotonic() - start < 10
    message = str(caught.value)
    assert "\n" not in message and url in message and str(destination) in message and "by hand" in message
    assert not destination.exists() and not destination.with_suffix(".part").exists()


def test_download_missing_file_url_raises(tmp_path):
    url = (tmp_path / "missing.zip").as_uri()
    with pytest.raises(UserError, match="could not download"):
        download(url, tmp_path / "x.zip", show_progress=False)
    assert list(tmp_path.iterdir()) == []


class FakeResponse(io.BytesIO):
    """A urlopen answer whose body fails after ``fail_after`` bytes, or is shorter than announced."""

    def __init__(self, data: bytes, length: int, fail_after: int | None = None):
        super().__init__(data)
        self.headers = {"Content-Length": str(length)}
        self.fail_after = fail_after

    def read(self, size=-1):
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        return super().read(min(size, 1000) if size and size > 0 else 1000)


@pytest.mark.parametrize(
    "response", [lambda: FakeResponse(b"x" * 5000, 5000, fail_after=2000), lambda: FakeResponse(b"x" * 3000, 5000)]
)
def test_interrupted_download_leaves_nothing(tmp_path, monkeypatch, response):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: response())
    destination = tmp_path / "PennFudanPed.zip"
    with pytest.raises(UserError) as caught:
        download("https://example.invalid/PennFudanPed.zip", destination, show_progress=False)
    assert "https://example.invalid/PennFudanPed.zip" in str(caught.value) and "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # neither the file nor the .part


# ---------------------------------------------------------------------------------------------------
# download_main
# ---------------------------------------------------------------------------------------------------


def make_pennfudan_zip(path: Path) -> dict:
    members = {
        "PennFudanPed/": b"",
        "PennFudanPed/readme.txt": b"Penn-Fudan Database for Pedestrian Detection and Segmentation\n",
    }
    for stem in STEMS:
        members[f"PennFudanPed/PNGImages/{stem}.png"] = f"image {stem}".encode()
        members[f"PennFudanPed/PedMasks/{stem}_mask.png"] = f"mask {stem}".encode()
        members[f"PennFudanPed/Annotation/{stem}.txt"] = f"annotation {stem}".encode()
    make_zip(path, members)
    return members


def test_download_main_pennfudan_end_to_end(tmp_path, monkeypatch, capsys):
    source = tmp_path / "server" / "PennFudanPed.zip"
    source.parent.mkdir()
    members = make_pennfudan_zip(source)
    monkeypatch.setattr(dl, "PENNFUDAN_URL", source.as_uri())
    data = tmp_path / "data"
    assert download_main(["pennfudan", "--to", str(data), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (data / "PennFudanPed.zip").read_bytes() == source.read_bytes()
    expected = {name: content for name, content in members.items() if not name.endswith("/")}
    expected["PennFudanPed.zip"] = source.read_bytes()
    assert files_under(data) == expected
    assert "3 images" in out
    assert "train.dataset_name=pennfudan" in out and f"train.data={(data / 'PennFudanPed').as_posix()}" in out

    # a second run finds the data and does not download again
    monkeypatch.setattr(dl, "PENNFUDAN_URL", "http://127.0.0.1:9/gone.zip")
    assert download_main(["download", "pennfudan", "--to", str(data)]) == 0
    assert "already there" in capsys.readouterr().out


def test_download_main_pennfudan_uses_a_zip_downloaded_by_hand(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    make_pennfudan_zip(data / "PennFudanPed.zip")
    monkeypatch.setattr(dl, "PENNFUDAN_URL", "http://127.0.0.1:9/unreachable.zip")
    assert download_main(["pennfudan", "--to", str(data)]) == 0
    assert check_pennfudan(data / "PennFudanPed")["pairs"] == 3


def test_download_main_reports_errors_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dl, "PENNFUDAN_URL", "http://127.0.0.1:9/PennFudanPed.zip")
    assert download_main(["pennfudan", "--to", str(tmp_path / "data"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "127.0.0.1:9" in err[0]


def test_download_main_refuses_a_malicious_download(tmp_path, monkeypatch, capsys):
    source = tmp_path / "server" / "PennFudanPed.zip"
    source.parent.mkdir()
    make_zip(source, {"PennFudanPed/readme.txt": b"hi", "../evil.txt": b"evil"})
    monkeypatch.setattr(dl, "PENNFUDAN_URL", source.as_uri())
    assert download_main(["pennfudan", "--to", str(tmp_path / "data"), "--no-progress"]) == 1
    assert "../evil.txt" in capsys.readouterr().err
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "data" / "PennFudanPed").exists()


def test_download_main_isbi2012_prints_the_help(tmp_path, capsys):
    assert download_main(["isbi2012", "--to", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert ISBI2012_HELP in out
    for needed in (
        "train-volume.tif",
        "train-labels.tif",
        "test-volume.tif",
        "images/",
        "labels/",
        "train.data",
        "ISBI 2012 challenge website",
    ):
        assert needed in ISBI2012_HELP
    assert "not found" in out

    (tmp_path / "isbi2012").mkdir()
    (tmp_path / "isbi2012" / "train-volume.tif").write_bytes(b"tif")
    (tmp_path / "isbi2012" / "train-labels.tif").write_bytes(b"tif")
    assert download_main(["download", "isbi2012", "--to", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "not found" not in out and "ready" in out
    assert f"train.data={(tmp_path / 'isbi2012').as_posix()}" in out and "train.dataset_name=isbi2012" in out


def test_isbi2012_help_names_no_web_host():
    assert "http" not in ISBI2012_HELP and "www" not in ISBI2012_HELP and ".org" not in ISBI2012_HELP


def test_download_main_bad_arguments(capsys):
    assert download_main(["mnist"]) == 2
    assert "invalid choice" in capsys.readouterr().err
