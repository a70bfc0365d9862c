"""What a torchrun restart costs: a worker killed inside an epoch, and the seconds until the new group steps.

``bench.py --restart-cost TRIES`` trains the shipped config for 4 epochs with ``torchrun --nproc_per_node=2
--max-restarts=1`` on the CPU (gloo), SIGKILLs the worker of rank 1 a few seconds into epoch 3 and reads,
from the run's own output, when the restarted group printed its ``resuming`` line and when its progress bar
showed the first step, and how many steps of epoch 3 the bar had shown before the kill (the steps done
again, as the last save was at the end of epoch 2). Linux only: the workers are found in ``/proc``.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from segmentation.benchmarks.speed import ROOT

FIRST_STEP = re.compile(r"epoch 3/\d+: +\d+%\|[^|]*\| *([1-9]\d*)/")  # the bar of epoch 3 past its first step


def restart_cost_table(tries: int, seconds_into_epoch: float = 3.0) -> None:
    """Print, for each try, the seconds from the kill to the restarted group's ``resuming`` line and to its
    first step, and the steps of epoch 3 done before the kill."""
    print(
        f"torchrun restart, 2 gloo processes, the shipped config; worker 1 killed {seconds_into_epoch:g} s into epoch 3"
    )
    print(f"{'try':>3} {'to resuming (s)':>16} {'to first step (s)':>18} {'steps repeated':>15} {'exit':>5}")
    for attempt in range(tries):
        with tempfile.TemporaryDirectory() as folder:
            result = killed_run(Path(folder), seconds_into_epoch)
        print(
            f"{attempt + 1:>3} {result['resuming']:>16.1f} {result['first_step']:>18.1f} "
            f"{result['repeated']:>15} {result['exit']:>5}"
        )


def killed_run(out: Path, seconds_into_epoch: float) -> dict:
    """One torchrun launch into ``out`` with worker 1 killed ``seconds_into_epoch`` into epoch 3."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folders = [f"train.save_path={out / 'weights'}", f"train.log_path={out / 'logs'}", f"train.cache_dir={out / 'c'}"]
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1"),
        *("--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={uuid.uuid4()}"),
        *("training.py", "train.max_epochs=4", "train.device=cpu", "train.run_name=restart", *folders),
    ]
    agent = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    output: list[tuple[float, str, str]] = []  # (time, stream, text) as it arrives
    readers = [
        threading.Thread(target=collect, args=(stream, name, output), daemon=True)
        for stream, name in ((agent.stdout, "out"), (agent.stderr, "err"))
    ]
    for reader in readers:
        reader.start()
    metrics = out / "logs" / "restart" / "metrics.csv"
    while agent.poll() is None and 2 not in logged_epochs(metrics):
        time.sleep(0.02)
    time.sleep(seconds_into_epoch)
    killed = time.time()
    os.kill(worker_of_rank(agent.pid, 1), signal.SIGKILL)
    agent.wait()
    for reader in readers:
        reader.join(10)
    before = "".join(text for moment, stream, text in output if stream == "err" and moment < killed)
    resuming = next(
        moment for moment, stream, text in output if stream == "out" and moment > killed and "resuming" in text
    )
    first_step = next(
        moment for moment, stream, text in output if stream == "err" and moment > resuming and FIRST_STEP.search(text)
    )
    return {
        "resuming": resuming - killed,
        "first_step": first_step - killed,
        "repeated": max((int(done) for done in FIRST_STEP.findall(before)), default=0),
        "exit": agent.returncode,
    }


def collect(stream, name: str, output: list) -> None:
    """Append what ``stream`` delivers, with the time it came, to ``output``."""
    while chunk := os.read(stream.fileno(), 65536):
        output.append((time.time(), name, chunk.decode(errors="replace")))


def logged_epochs(metrics: Path) -> list[int]:
    if not metrics.is_file():
        return []
    with metrics.open() as file:
        return [int(row["epoch"]) for row in csv.DictReader(file)]


def worker_of_rank(agent: int, rank: int) -> int:
    """The process id of the agent's worker with global rank ``rank`` (Linux ``/proc``)."""
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) if entry.name.isdigit() else None
            if parent == agent and f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except (OSError, IndexError, ValueError):  # a process that ended meanwhile
            continue
    raise RuntimeError(f"no worker of rank {rank} under torchrun's agent {agent}: the run ended first")
