"""Bytes a command and every process it starts write to storage, from `/proc/<pid>/io`.

`measure(cmd)` runs `cmd` and polls its process tree (the command, the Ray daemons and workers
it starts, anything they start) every `interval` seconds, keeping each process's last
`write_bytes` (bytes it caused to be sent to the storage layer, counted when a page is
dirtied) and `cancelled_write_bytes` (dirty pages it truncated or deleted before writeback).
A process is keyed by (pid, start time), so a reused pid is a new process, and it stays
tracked after it is reparented. A process that exits between two polls loses what it wrote
since the last poll, so the sum is a lower bound within one polling interval per process.
tmpfs (e.g. /dev/shm, Ray's object store) is not counted: it is memory, not storage.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")


def parse_io(text: str) -> dict[str, int]:
    """The fields of a `/proc/<pid>/io` file."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if value.strip().isdigit():
            out[key.strip()] = int(value)
    return out


def parse_stat(text: str) -> tuple[int, int]:
    """(parent pid, start time in clock ticks) from a `/proc/<pid>/stat` line; the command
    name (field 2) may hold spaces and parentheses, so fields are counted after its last ')'."""
    rest = text[text.rindex(")") + 2:].split()
    return int(rest[1]), int(rest[19])


def tree(root: int, parents: dict[int, int]) -> set[int]:
    """`root` and all its descendants, given each live pid's parent."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, ()))
    return out


def _snapshot() -> dict[int, tuple[int, int]]:
    """Every live pid -> (parent pid, start time)."""
    out = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = parse_stat((entry / "stat").read_text())
            except (OSError, ValueError, IndexError):
                continue
    return out


@dataclass
class DiskWrites:
    """What `measure` saw: per process (pid, start) its command and last io counters."""

    returncode: int = 0
    wall_s: float = 0.0  # to the end of the measurement (daemons left behind followed)
    exit_s: float = 0.0  # to the command's own exit (within the polling interval)
    procs: dict[tuple[int, int], dict] = field(default_factory=dict)

    @property
    def write_bytes(self) -> int:
        return sum(p["write_bytes"] for p in self.procs.values())

    @property
    def cancelled_write_bytes(self) -> int:
        return sum(p["cancelled_write_bytes"] for p in self.procs.values())

    def by_command(self) -> dict[str, int]:
        """write_bytes summed per command name (e.g. python, raylet, gcs_server)."""
        out: dict[str, int] = {}
        for p in self.procs.values():
            out[p["comm"]] = out.get(p["comm"], 0) + p["write_bytes"]
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def measure(cmd: Sequence[str], interval: float = 0.2, timeout: float | None = None,
            env: dict[str, str] | None = None, cwd: str | Path | None = None,
            log: Path | None = None, linger: float = 20.0) -> DiskWrites:
    """Run `cmd` to its end and count what its process tree wrote (see the module doc)."""
    out = DiskWrites()
    sink = open(log, "w") if log else subprocess.DEVNULL
    t0 = time.monotonic()
    proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT)
    known: set[tuple[int, int]] = set()
    t_done = 0.0
    try:
        while True:
            done = proc.poll() is not None
            snap = _snapshot()
            live = tree(proc.pid, {pid: ppid for pid, (ppid, _) in snap.items()})
            # keep following processes seen before, even once reparented (to init)
            live |= {pid for pid, (_, start) in snap.items() if (pid, start) in known}
            for pid in live:
                if pid not in snap:
                    continue
                key = (pid, snap[pid][1])
                try:
                    io = parse_io((PROC / str(pid) / "io").read_text())
                    comm = (PROC / str(pid) / "comm").read_text().strip()
                    if key not in out.procs:
                        args = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
                        cmdline = " ".join(a.decode(errors="replace") for a in args)[:160]
                    else:
                        cmdline = out.procs[key]["cmdline"]
                except OSError:
                    continue
                known.add(key)
                out.procs[key] = {
                    "comm": comm, "cmdline": cmdline, "write_bytes": io.get("write_bytes", 0),
                    "cancelled_write_bytes": io.get("cancelled_write_bytes", 0)}
            if done:
                # processes the command left behind (Ray daemons shutting down) are followed
                # until they exit, for at most `linger` seconds
                t_done = t_done or time.monotonic()
                if (not any((pid, start) in known for pid, (_, start) in _snapshot().items())
                        or time.monotonic() - t_done > linger):
                    break
            if timeout and time.monotonic() - t0 > timeout and not done:
                proc.kill()
            time.sleep(interval)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if log:
            sink.close()  # type: ignore[union-attr]
    out.returncode = proc.returncode
    out.wall_s = time.monotonic() - t0
    out.exit_s = (t_done or time.monotonic()) - t0
    return out


def dir_bytes(path: Path) -> dict[str, int]:
    """Size of every file under `path` (relative name -> bytes)."""
    return {str(p.relative_to(path)): p.stat().st_size
            for p in sorted(path.rglob("*")) if p.is_file()}


def self_test() -> int:
    """Bytes counted for a child that writes and fsyncs 4 MiB (a sanity check)."""
    import sys
    import tempfile
    with tempfile.TemporaryDirectory(dir=".") as d:
        code = (f"import os\nf=open({str(Path(d) / 'x')!r},'wb')\nf.write(os.urandom(4<<20))\n"
                "f.flush(); os.fsync(f.fileno()); import time; time.sleep(0.5)")
        return measure([sys.executable, "-c", code]).write_bytes


if __name__ == "__main__":
    print(os.getpid(), self_test())
