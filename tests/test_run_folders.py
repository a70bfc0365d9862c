"""Run folders as training writes them: a new run's name is claimed so that two runs never share a folder, a run
folder is trained by one process at a time (segmentation.engine.lock), a refusal leaves no half-made run, and a
checkpoint's stored run name never leads outside the run folders."""

import errno
import json
import socket
import threading
from pathlib import Path

import pytest
import torch

from model import build_model
from segmentation.config import UserError, load_config
from segmentation.engine import lock, step
from segmentation.engine.lock import LOCK_NAME, take_run_lock
from segmentation.runs import folders
from segmentation.runs.folders import new_run_name
from tests.helpers import tiny_config
from training import train

HOST = socket.gethostname()


def run_settings(tmp_path: Path, *overrides: str):
    paths = [f"train.save_path={tmp_path / 'weights'}", f"train.log_path={tmp_path / 'logs'}"]
    return load_config(None, [*paths, *overrides]).run


def test_runs_started_at_the_same_moment_with_one_name_get_folders_of_their_own(tmp_path):
    run = run_settings(tmp_path, "train.run_name=same")
    names, start = [], threading.Barrier(8)

    def start_run() -> None:
        start.wait()
        names.append(new_run_name(run, "synthetic"))

    threads = [threading.Thread(target=start_run) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(names) == ["same", *(f"same-{count}" for count in range(2, 9))]
    for root in ("logs", "weights"):
        assert sorted(path.name for path in (tmp_path / root).iterdir()) == sorted(names)


@pytest.mark.parametrize("taken", ["logs", "weights"])
def test_a_name_claimed_between_the_look_and_the_mkdir_is_left_to_the_other_run(tmp_path, monkeypatch, taken):
    run = run_settings(tmp_path, "train.run_name=same")
    (tmp_path / taken / "same").mkdir(parents=True)  # the other run's, made after this one looked
    monkeypatch.setattr(folders.Path, "exists", lambda path: False)
    assert new_run_name(run, "synthetic") == "same-2"
    other = "weights" if taken == "logs" else "logs"
    assert sorted(path.name for path in (tmp_path / taken).iterdir()) == ["same", "same-2"]
    assert sorted(path.name for path in (tmp_path / other).iterdir()) == ["same-2"]  # its half of the claim undone


def test_a_search_run_claims_its_log_folder_only(tmp_path):
    run = run_settings(tmp_path, "train.run_name=search")
    folder = folders.new_run_folder(run, "overfit", "unet: {}\n")
    assert folder == tmp_path / "logs" / "search" and (folder / "config.yaml").read_text() == "unet: {}\n"
    assert not (tmp_path / "weights").exists()


def write_lock(folder: Path, pid: int, host: str = HOST, launch: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host, "launch": launch}) + "\n")
    return folder / LOCK_NAME


def test_a_run_that_a_live_process_trains_is_refused_in_one_line(tmp_path):
    path = write_lock(tmp_path / "weights" / "run", pid=1)  # init: alive on every Linux host
    with pytest.raises(UserError) as caught:
        take_run_lock(tmp_path / "weights" / "run", "run")
    assert str(caught.value) == (
        f"run run is being trained by process 1 on {HOST} ({path}): wait for it, or delete the lock if that process "
        "is gone"
    )
    assert json.loads(path.read_text())["pid"] == 1  # the other process's lock stays


def test_a_lock_is_created_held_and_released_by_its_own_process_only(tmp_path):
    held = take_run_lock(tmp_path, "run")
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == {"pid": held.holder.pid, "host": HOST, "launch": None}
    with held:
        pass
    assert not (tmp_path / LOCK_NAME).exists()
    other = write_lock(tmp_path, pid=1)
    held.release()  # another process's lock now: left alone
    assert other.exists()


def test_the_lock_of_a_process_that_is_gone_is_taken_over_with_a_note(tmp_path, capsys):
    gone = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # no process can have it
    write_lock(tmp_path, pid=gone)
    held = take_run_lock(tmp_path, "run")
    assert capsys.readouterr().err == (
        f"note: run run: taking over {tmp_path / LOCK_NAME} from process {gone} on {HOST}, which is gone\n"
    )
    assert lock.Holder.read(tmp_path / LOCK_NAME) == held.holder


def test_a_torchrun_group_started_again_takes_over_its_launchs_lock_from_any_host(tmp_path, monkeypatch, capsys):
    write_lock(tmp_path, pid=1, host="node-7", launch="launch-1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-2")
    with pytest.raises(UserError, match="is being trained by process 1 on node-7"):
        take_run_lock(tmp_path, "run")  # another launch: not this run's group
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-1")
    held = take_run_lock(tmp_path, "run")
    assert held.holder.launch == "launch-1" and "of the torchrun group before this one" in capsys.readouterr().err


def test_a_lock_file_that_names_no_process_is_refused(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(UserError, match=r"^run run is locked by .*\.lock, which names no process: .*delete the lock"):
        take_run_lock(tmp_path, "run")


def test_a_new_run_that_finds_the_disk_full_leaves_no_half_made_run(tmp_path, monkeypatch):
    def full(state, file):
        file.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match=r"^cannot write .*full/last\.pt: no space left on the device \(") as caught:
        train(tiny_config(tmp_path, "train.run_name=full"))
    assert str(caught.value).endswith("free some space or set train.save_path; the earlier checkpoints are intact")
    assert not (tmp_path / "weights" / "full").exists() and not (tmp_path / "logs" / "full").exists()


def test_resuming_a_checkpoint_whose_run_name_leaves_the_run_folders_writes_nothing(tmp_path):
    config = tiny_config(tmp_path)
    state = {
        "model": build_model(config.unet).state_dict(),
        "config": config.to_dict(),
        "progress": {"epoch": 1, "run_name": "../../escaped"},
    }
    (tmp_path / "elsewhere").mkdir()
    torch.save(state, tmp_path / "elsewhere" / "last.pt")
    with pytest.raises(UserError, match=r"its progress names the run '\.\./\.\./escaped', which is not one folder"):
        train(tiny_config(tmp_path, f"train.resume={tmp_path / 'elsewhere' / 'last.pt'}"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["elsewhere"]
    assert not (tmp_path.parent / "escaped").exists()


@pytest.mark.slow
def test_a_run_that_another_process_trains_is_refused_and_a_gone_ones_lock_taken_over(tmp_path, monkeypatch, capsys):
    first = train(tiny_config(tmp_path, "train.max_epochs=1", "train.run_name=held"))
    lock_file = first.folders.weights / LOCK_NAME
    assert not lock_file.exists()  # released when training ended
    lock_file.write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "launch": None}))  # init: alive
    saved = {path.name: path.read_bytes() for path in [*first.folders.weights.iterdir(), *first.folders.log.iterdir()]}
    with pytest.raises(UserError) as caught:
        train(tiny_config(tmp_path, "train.max_epochs=2", "train.resume=auto"))
    assert str(caught.value) == (
        f"run held is being trained by process 1 on {socket.gethostname()} ({lock_file}): wait for it, or delete the "
        "lock if that process is gone"
    )
    after = {path.name: path.read_bytes() for path in [*first.folders.weights.iterdir(), *first.folders.log.iterdir()]}
    assert after == saved  # nothing of the run written, the other process's lock kept
    gone = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    lock_file.write_text(json.dumps({"pid": gone, "host": socket.gethostname(), "launch": None}))
    capsys.readouterr()
    original = step.segmentation_loss
    monkeypatch.setattr(step, "segmentation_loss", lambda *args: original(*args) * float("nan"))
    with pytest.raises(UserError, match="training loss became nan"):
        train(tiny_config(tmp_path, "train.max_epochs=2", "train.resume=auto"))
    assert f"taking over {lock_file} from process {gone}" in capsys.readouterr().err
    assert not lock_file.exists()  # released on the error too
