"""Detached processes with pid files under the state dir: start, wait for health, stop only what we started."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from components.errors import ServiceError


@dataclass(frozen=True)
class ProcessRecord:
    name: str
    pid: int
    start_ticks: int  # /proc/PID/stat start time: tells our process from a later one that reuses its pid
    log: str


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the command name in field 2 may contain spaces, so split after its ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_file(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.json"


def read_record(run_dir: Path, name: str) -> ProcessRecord | None:
    path = pid_file(run_dir, name)
    try:
        return ProcessRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def is_alive(record: ProcessRecord | None) -> bool:
    return record is not None and _start_ticks(record.pid) == record.start_ticks


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def start(
    name: str, cmd: list[str], run_dir: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> ProcessRecord:
    """Start ``cmd`` in its own session (so its children can be stopped together), logging to run_dir/NAME.log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / f"{name}.log"
    with log_path.open("ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
    ticks = _start_ticks(proc.pid) or 0
    record = ProcessRecord(name=name, pid=proc.pid, start_ticks=ticks, log=str(log_path))
    pid_file(run_dir, name).write_text(json.dumps(record.__dict__))
    return record


def stop(run_dir: Path, name: str, timeout_s: float = 30.0) -> bool:
    """Stop the process group we started under ``name``; True if something was stopped."""
    record = read_record(run_dir, name)
    stopped = False
    if record is not None and is_alive(record):
        stopped = True
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(record.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and _group_alive(record.pid):
                _reap(record.pid)
                time.sleep(0.2)
            if not _group_alive(record.pid):
                break
    pid_file(run_dir, name).unlink(missing_ok=True)
    return stopped


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies still count for killpg; look for a live member of the group.
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def last_log_line(log: str | Path, pattern: str = "") -> str:
    """The last non-empty line of a log (the last one containing ``pattern`` when one does)."""
    try:
        lines = [ln.strip() for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    if pattern:
        hits = [ln for ln in lines if pattern.lower() in ln.lower()]
        if hits:
            return hits[-1][-300:]
    return lines[-1][-300:] if lines else "empty log"


def wait_until(
    name: str, check: Callable[[], bool], record: ProcessRecord | None, timeout_s: float, interval_s: float = 1.0
) -> None:
    """Poll ``check`` until it passes; fail fast with the log's last error if the process exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if record is not None and not is_alive(record):
            raise ServiceError(
                f"{name} exited while starting: {last_log_line(record.log, 'error')} (log: {record.log})"
            )
        time.sleep(interval_s)
    where = f" (log: {record.log})" if record else ""
    raise ServiceError(f"{name} was not healthy after {timeout_s:.0f} s{where}")
