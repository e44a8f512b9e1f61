"""A CUDA MPS control daemon of a benchmark's own, for the packed-trial measurements
(`benchmarks.packing_probe --mps`, `make bench`'s `study_mps` section).

Without MPS the kernels of different processes on one GPU do not run at the same time (the GPU
switches between their contexts); under an MPS server they share the GPU as one context's
streams would. The daemon here keeps its pipe and log folders in a folder of the caller's
(`CUDA_MPS_PIPE_DIRECTORY`, `CUDA_MPS_LOG_DIRECTORY`), so only processes given its `env` use it,
and is told to quit at the end (a `timeout`'s SIGTERM included, where the caller turns it into
an exit). A client that cannot reach the daemon runs without MPS and says nothing: a caller
asks `get_server_list` after its work to know whether a server ran (`served`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path


class MPSDaemon:
    """A CUDA MPS control daemon of the caller's own (its pipe and log folders in `folder`),
    started with `nvidia-cuda-mps-control -d` and told to quit at the end; `env` is what its
    clients need. `why_not` says why it could not start (None when it runs)."""

    def __init__(self, folder: Path) -> None:
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"),
                    "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
        self.why_not: str | None = None
        self.quit: str | None = None  # what `quit` answered, at the end
        self.binary = shutil.which("nvidia-cuda-mps-control")

    def __enter__(self) -> MPSDaemon:
        if self.binary is None:
            self.why_not = "nvidia-cuda-mps-control is not on this machine"
            return self
        for d in self.env.values():
            Path(d).mkdir(parents=True, exist_ok=True)
        res = subprocess.run([self.binary, "-d"], env={**os.environ, **self.env},
                             capture_output=True, text=True)
        if res.returncode != 0:
            self.why_not = f"nvidia-cuda-mps-control -d: rc {res.returncode} {res.stderr[-300:]}"
        return self

    def command(self, line: str, timeout_s: float = 30.0) -> tuple[int, str]:
        """One command to the daemon (`get_server_list`, `quit`): its return code and output."""
        assert self.binary is not None
        try:
            res = subprocess.run([self.binary], input=line + "\n", capture_output=True,
                                 text=True, timeout=timeout_s, env={**os.environ, **self.env})
        except subprocess.TimeoutExpired:
            return -1, f"no answer to {line!r} in {timeout_s:g} s"
        return res.returncode, (res.stdout + res.stderr).strip()

    def __exit__(self, *exc: object) -> None:
        if self.binary is None or self.why_not is not None:
            return
        rc, text = self.command("quit")
        self.quit = f"rc {rc}" + (f": {text[-200:]}" if text else "")
        control = Path(self.env["CUDA_MPS_PIPE_DIRECTORY"]) / "control"
        deadline = time.monotonic() + 10
        while control.exists() and time.monotonic() < deadline:  # the daemon's own socket
            time.sleep(0.1)

    def served(self) -> tuple[bool, str | None]:
        """Whether the daemon lists a server now (a client reached it), and its answer."""
        if self.binary is None or self.why_not is not None:
            return False, None
        rc, servers = self.command("get_server_list")
        return rc == 0 and bool(servers.strip()), servers if rc == 0 else None
