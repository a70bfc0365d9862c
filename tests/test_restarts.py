"""segmentation.engine.restarts and the process group's store: a torchrun restart continues its own run,
a lost process is one line; the restart itself with torchrun's own elastic agent (2 gloo processes on the CPU)."""

import contextlib
import csv
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from segmentation.config import load_config
from segmentation.console import report_error
from segmentation.engine.distributed import (
    GROUP_TIMEOUT,
    LOST_PEER_SIGNS,
    agent_store,
    group_store,
    lost_process,
    process_group,
)
from segmentation.engine.restarts import continued_after_restart, publish_run
from segmentation.engine.signals import stop_requests
from tests.helpers import ROOT, TINY, assert_same_weights

GLOO_LOST = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
    "[127.0.0.1]:15274. This is typically caused by a remote worker crashing."
)
# gloo's words when the lost process still had unread data in its socket (it was descheduled: a loaded machine)
GLOO_RESET = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:9939: "
    "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application."
)


@pytest.fixture
def agent(monkeypatch):
    """A store in the place of torchrun's agent store, as torchrun's environment names it."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    return server


def started_run(save_path: Path, name: str) -> Path:
    """A run's checkpoint folder with its first last.pt, recorded as process 0 records it."""
    (save_path / name).mkdir(parents=True)
    (save_path / name / "last.pt").write_bytes(b"")
    publish_run(save_path / name)
    return save_path / name


def run_settings(tmp_path: Path, *overrides: str):
    return load_config(None, [f"train.save_path={tmp_path}", *overrides]).run


def test_a_restarted_group_continues_the_run_the_group_before_it_trained(tmp_path, agent):
    settings = run_settings(tmp_path)
    (tmp_path / "older").mkdir()
    (tmp_path / "older" / "last.pt").write_bytes(b"")  # a run of an earlier launch: not this launch's
    assert continued_after_restart(settings, every_fold=False) == (
        settings,
        None,
    )  # the first group of a launch: as configured
    started_run(tmp_path, "elastic")
    continued, message = continued_after_restart(settings, every_fold=False)
    assert continued.resume == str(tmp_path / "elastic" / "last.pt")
    assert message == f"torchrun started the processes again: continuing run elastic from {continued.resume}"
    (tmp_path / "elastic" / "last.pt").unlink()
    continued, message = continued_after_restart(settings, every_fold=False)
    assert continued == settings and message.endswith("last.pt is gone: starting a new run")


def test_a_restart_under_fold_all_continues_the_series(tmp_path, agent):
    started_run(tmp_path, "series-fold0")
    started_run(tmp_path, "series-fold1")
    continued, message = continued_after_restart(run_settings(tmp_path), every_fold=True)
    assert (continued.run_name, continued.resume) == ("series", "auto")
    assert "continuing the folds of series (series-fold1 and on)" in message


def test_outside_torchrun_or_without_its_store_nothing_is_continued(tmp_path, monkeypatch):
    settings = run_settings(tmp_path)
    assert continued_after_restart(settings, every_fold=False) == (settings, None)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # restarted, but with no store to find the run in
    continued, message = continued_after_restart(settings, every_fold=False)
    assert continued == settings and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in message and "resume=auto" in message


def test_a_lost_peer_is_one_line_in_every_surviving_process(monkeypatch, capsys):
    lost = lost_process(RuntimeError(GLOO_LOST), rank=1, world_size=2)
    assert str(lost).startswith(
        "process 0 of 2 is gone (Connection closed by peer [127.0.0.1]:15274); process 1 stops too, without saving"
    )
    assert "\n" not in str(lost) and "pair.cc" not in str(lost)
    reset = str(lost_process(RuntimeError(GLOO_RESET), rank=1, world_size=2))
    assert reset.startswith("process 0 of 2 is gone (Read error [127.0.0.1]:9939: Connection reset by peer); process 1")
    assert "another of the 4 processes" in str(lost_process(RuntimeError(GLOO_LOST), 2, 4))
    assert lost_process(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), 0, 2) is None
    assert lost_process(RuntimeError(GLOO_LOST), 0, 1) is None
    monkeypatch.setenv("RANK", "1")  # process 0 may be the one that is gone: process 1 says it
    assert report_error(lost) == 1
    assert capsys.readouterr().err == f"error: {lost}\n"


def test_a_sigterm_in_a_process_group_never_ends_it_before_its_line(monkeypatch, capsys):
    """torchrun's agent stops the survivors of a lost process with SIGTERM, often while they unwind the failed
    collective that told them: the group holds it, so that they say their one line; before the training loop it
    asks the loop to stop."""
    torchrun = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**torchrun, "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)

    def unheld(signum, frame):
        raise AssertionError("SIGTERM not held: by default it would have ended the process before its line")

    before = signal.signal(signal.SIGTERM, unheld)
    try:
        with process_group("cpu"):
            os.kill(os.getpid(), signal.SIGTERM)  # in set-up, or while an error unwinds: noted
            with stop_requests() as requested:
                assert requested == [signal.SIGTERM], "the loop stops at its first vote"
            os.kill(os.getpid(), signal.SIGTERM)  # after the loop: noted again
        assert signal.getsignal(signal.SIGTERM) is unheld
        with stop_requests() as requested:
            assert requested == [], "a held SIGTERM belongs to its own process group"
    finally:
        signal.signal(signal.SIGTERM, before)
    # nothing printed at once: the line that follows says what came of it (saved, or a process gone)
    assert capsys.readouterr().err == ""


def test_each_group_of_processes_gets_a_store_prefix_of_its_own(agent):
    """torchrun's agent keeps one store for all its groups: a restarted group must not read what the group
    before it (here: a dead process 1 that asked with a nonce, and its answer) left there."""
    agent.set("unet-group/ask/1", "stale-nonce")
    agent.set("unet-group/answer/stale-nonce", "stale-token")

    def group() -> list:
        stores = [None, None]

        def join(rank: int) -> None:
            stores[rank] = group_store(agent_store(), rank, 2, timedelta(seconds=30))

        threads = [threading.Thread(target=join, args=(rank,)) for rank in (1, 0)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        return stores

    first, second = group(), group()
    first[1].set("address", "first")
    assert first[0].get("address") == b"first"
    assert not second[0].check(["address"]), "a restarted group read the group before it"
    second[0].set("address", "second")
    assert second[1].get("address") == b"second" and first[0].get("address") == b"first"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


ELASTIC = [
    *[override for override in TINY if not override.startswith("train.samples_per_image")],
    "train.samples_per_image=16",  # 16 steps of 4 tiles per epoch: the kill lands inside an epoch
    "train.max_epochs=6",
    "train.run_name=elastic",
]


def torchrun_command(out: Path, *launcher: str) -> list[str]:
    folders = [
        f"train.save_path={out / 'weights'}",
        f"train.log_path={out / 'logs'}",
        f"train.cache_dir={out / 'cache'}",
    ]
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "training.py", *ELASTIC, *folders]


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):  # a process that ended meanwhile
            continue
    return found


def rank_of(pid: int) -> int | None:
    try:
        environment = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(item[5:]) for item in environment if item.startswith(b"RANK=")), None)


def epochs_logged(out: Path) -> list[int]:
    path = out / "logs" / "elastic" / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as file:
        return [int(row["epoch"]) for row in csv.DictReader(file)]


@contextlib.contextmanager
def agents_running(out: Path, count: int, *launcher: str) -> Iterator[list[subprocess.Popen]]:
    """``count`` torchrun agents training the ELASTIC run into ``out``, as if on ``count`` machines. Those still
    running when the block ends (a failed test) are stopped with their workers, so as to load no later test."""
    agents = [
        subprocess.Popen(
            torchrun_command(out, *launcher),
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    try:
        yield agents
    finally:
        running = [agent for agent in agents if agent.poll() is None]
        for agent in running:
            agent.terminate()  # torchrun's agent passes SIGTERM on to its workers, and SIGKILL 30 s later
        for agent in running:
            try:
                agent.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                agent.kill()


def kill_after_epoch(agents: list[subprocess.Popen], out: Path, rank: int, epoch: int, limit: float) -> None:
    """SIGKILL the worker of global rank ``rank`` once ``epoch`` is in metrics.csv (within ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    while epoch not in epochs_logged(out) and all(agent.poll() is None for agent in agents):
        assert time.monotonic() < deadline, f"epoch {epoch} not in metrics.csv after {limit:.0f} s"
        time.sleep(0.02)
    workers = {rank_of(pid): pid for agent in agents for pid in children(agent.pid)}
    assert rank in workers, "the run ended before a worker could be killed"
    os.kill(workers[rank], signal.SIGKILL)


def without_progress_bars(stderr: str) -> str:
    """``stderr`` without tqdm's progress bars, whose redraws would crowd out the lines a failure is about."""
    return "\n".join(line for line in stderr.splitlines() if line.strip() and "%|" not in line)[-5000:]


def outputs_of(agents: list[subprocess.Popen], limit: float) -> tuple[str, str]:
    """The agents' stdout and stderr, joined, once every agent has exited 0 (within ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    outputs = [agent.communicate(timeout=max(1.0, deadline - time.monotonic())) for agent in agents]
    codes = [agent.returncode for agent in agents]
    assert codes == [0] * len(agents), "\n".join(without_progress_bars(err) for _, err in outputs)
    return "".join(out for out, _ in outputs), "".join(err for _, err in outputs)


def assert_one_line_for_the_lost_process(stderr: str, lost: int, survivor: int) -> None:
    """The surviving process said once that process ``lost`` is gone, in whatever words gloo had for it (the
    lost process may or may not have had unread data), and nothing else: no traceback, no promise of a save."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    lines = without_progress_bars(stderr)
    assert len(errors) == 1 and errors[0].startswith(f"error: process {lost} of 2 is gone ("), lines
    assert any(sign in errors[0] for sign in LOST_PEER_SIGNS), errors[0]
    assert f"; process {survivor} stops too, without saving." in errors[0]
    assert "Traceback" not in stderr and "stopping after this step" not in stderr, lines


@dataclasses.dataclass(frozen=True)
class Uninterrupted:
    """The ELASTIC run trained by 2 processes without a break: its last.pt, and how long its launch took here."""

    last: dict
    seconds: float

    @property
    def limit(self) -> float:
        """Seconds after which a launch of the same run is hung, not slow: measured beside it, on the same
        machine under the same load, a restarted launch takes about 1.5 times as long (its processes start
        twice and repeat the steps since the last save)."""
        return max(300.0, HUNG_AFTER * self.seconds)


HUNG_AFTER = 10  # times the uninterrupted launch
# the uninterrupted launch has nothing to be measured by: it waits as long as a process of its group would wait
FIRST_LAUNCH_LIMIT = GROUP_TIMEOUT.total_seconds()


def assert_one_whole_run(out: Path, uninterrupted: Uninterrupted) -> None:
    """One run folder, each epoch in metrics.csv once, and the weights of the uninterrupted run."""
    assert sorted(path.name for path in (out / "weights").iterdir()) == ["elastic"]
    assert epochs_logged(out) == [1, 2, 3, 4, 5, 6]
    last = torch.load(out / "weights" / "elastic" / "last.pt", weights_only=True)
    assert_same_weights(last["model"], uninterrupted.last["model"])
    assert last["progress"]["step"] == uninterrupted.last["progress"]["step"] == 6 * 16


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Uninterrupted:
    """The ELASTIC run trained by 2 processes without a break, and timed: the other launches are measured by it."""
    out = tmp_path_factory.mktemp("uninterrupted")
    start = time.monotonic()
    with agents_running(out, 1, "--standalone", "--nproc_per_node=2") as agents:
        outputs_of(agents, FIRST_LAUNCH_LIMIT)
    last = torch.load(out / "weights" / "elastic" / "last.pt", weights_only=True)
    return Uninterrupted(last, time.monotonic() - start)


LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers in /proc")


@pytest.mark.slow
@LINUX_PROC
def test_a_worker_killed_under_torchrun_restarts_and_the_run_ends_as_if_uninterrupted(tmp_path, uninterrupted):
    rendezvous = [f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--rdzv-id={uuid.uuid4()}", "--rdzv-backend=c10d"]
    with agents_running(tmp_path, 1, "--nproc_per_node=2", "--max-restarts=1", *rendezvous) as agents:
        kill_after_epoch(agents, tmp_path, rank=1, epoch=2, limit=uninterrupted.limit)
        stdout, stderr = outputs_of(agents, uninterrupted.limit)
    assert_one_line_for_the_lost_process(stderr, lost=1, survivor=0)
    assert "note: torchrun started the processes again: continuing run elastic from" in stderr
    assert "resuming" in stdout
    assert_one_whole_run(tmp_path, uninterrupted)


@pytest.mark.slow
@LINUX_PROC
@pytest.mark.parametrize("killed", [False, True], ids=["uninterrupted", "one-killed"])
def test_two_torchrun_agents_as_two_machines_train_one_run(tmp_path, uninterrupted, killed):
    """Two agents of one process each: process 0 alone prints and writes; after a kill both agents restart
    (one counts it as a restart, the other as a change of members) and continue the same run."""
    rendezvous = [f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--rdzv-id={uuid.uuid4()}", "--rdzv-backend=c10d"]
    launcher = ["--nnodes=2", "--nproc_per_node=1", "--max-restarts=1", *rendezvous]
    with agents_running(tmp_path, 2, *launcher) as agents:
        if killed:
            kill_after_epoch(agents, tmp_path, rank=1, epoch=2, limit=uninterrupted.limit)
        stdout, stderr = outputs_of(agents, uninterrupted.limit)
    assert stdout.count("U-Net ") == 1 + killed, "process 0 alone prints"
    assert ("continuing run elastic" in stderr) == killed
    if killed:
        assert_one_line_for_the_lost_process(stderr, lost=1, survivor=0)
    assert_one_whole_run(tmp_path, uninterrupted)
