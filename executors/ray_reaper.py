"""The local Ray cluster a driver starts ends with the driver, however the driver ends.

``ray.init()`` without an address starts a cluster whose processes outlive a driver killed
with SIGKILL (and some, Ray's dashboard and runtime-environment agents, outlive its raylet
after Ctrl-C too): each kill left processes behind. So before starting one, the driver marks
its environment with a token that every process of the cluster inherits, and starts a small
reaper in its own session holding the read end of a pipe. When the driver ends, by exit,
Ctrl-C or SIGKILL alike, the kernel closes the pipe; the reaper then ends every process
whose environment carries the token (SIGTERM, then SIGKILL after a grace period) and exits.
A cluster joined by address is not ours and is left alone. Linux reads other processes'
environments from ``/proc``; elsewhere the reaper finds none and does nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

TOKEN_VARIABLE = "EDITFLOW_RAY_CLUSTER"
GRACE_SECONDS = 3.0

_REAPER = r"""
import os, signal, sys, time

token, grace = sys.argv[1].encode(), float(sys.argv[2])
sys.stdin.buffer.read()  # returns when the driver's end of the pipe closes: the driver ended


def marked():
    found = []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:
                if b"EDITFLOW_RAY_CLUSTER=" + token in handle.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            pass
    return found


for sig in (signal.SIGTERM, signal.SIGKILL):
    for pid in marked():
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while marked() and time.monotonic() < deadline:
        time.sleep(0.1)
"""


def reap_with_this_process() -> None:
    """Mark this process's environment for the cluster it is about to start, and start the
    reaper that ends the cluster when this process ends.

    The pipe's write end stays open, unowned, for as long as this process lives: no object
    holds it that could be collected, and no child started by exec inherits it (descriptors
    are not inheritable by default), so only this process's end closes it.
    """
    token = uuid.uuid4().hex
    os.environ[TOKEN_VARIABLE] = token
    environment = {key: value for key, value in os.environ.items() if key != TOKEN_VARIABLE}
    read_end, _ = os.pipe()  # the write end: the signal, closed by the kernel at our end
    try:
        subprocess.Popen(
            [sys.executable, "-c", _REAPER, token, str(GRACE_SECONDS)],
            stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=environment, start_new_session=True,  # Ctrl-C to the driver's group spares it
        )  # fmt: skip
    finally:
        os.close(read_end)  # the reaper holds its own copy
