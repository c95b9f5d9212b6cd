"""Per-process CPU and memory from /proc (Linux), and the child processes the bench owns.

CPU is `utime + stime` of /proc/<pid>/stat (all threads of the process, including threads that
already exited), in clock ticks (`SC_CLK_TCK`, usually 100 Hz: 10 ms resolution). Memory is
`VmRSS` (now) and `VmHWM` (peak since start) of /proc/<pid>/status.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from promptline.devtools.embedded_redis import free_port as free_port  # re-exported for the bench

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by `pid` (0.0 once it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may contain spaces: the fields we want follow its ')'.
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    """A numeric field of /proc/<pid>/status (VmRSS, VmHWM in KiB; Threads); 0 once the process
    is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_fds(pid: int) -> int:
    """Open file descriptors of `pid` (sockets included); 0 once it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def threads(pid: int) -> int:
    return status_kib(pid, "Threads")  # a plain count, same format


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (LiteLLM may fork workers; our services do not)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(")") + 2:].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(parents.get(current, ()))
    return out


def cpu_tree(pid: int) -> float:
    return sum(cpu_seconds(p) for p in process_tree(pid))


def rss_tree(pid: int) -> int:
    return sum(status_kib(p, "VmRSS") for p in process_tree(pid))


def wait_port(port: int, proc: subprocess.Popen[bytes], name: str, timeout: float) -> None:
    """Until something accepts on 127.0.0.1:port; RuntimeError if `proc` died or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode} during start-up")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on port {port} within {timeout:g}s")


class Child:
    """A child process in its own process group (so signals to the bench do not reach it).

    By default also in its own session, as `make run` starts the services: where the kernel has
    autogroups on, each session is then scheduled as one group, and when the box is short of
    CPU that decides who waits (docs/performance.md, C=200 gap). `own_session=False` keeps it
    in the bench's session, scheduled thread by thread with everything else the bench started.
    """

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], cwd: str,
                 log_path: Path, own_session: bool = True) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=own_session,
                                     process_group=None if own_session else 0)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds; also ends anything it forked."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        else:  # the leader is gone; workers it forked may still be in its group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
