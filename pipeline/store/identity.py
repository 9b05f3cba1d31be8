"""Who holds a lease: an owner string that names one process across hosts and containers.

``host:pid:<boot>.<pidns>.<token>``: the host name alone is not unique (containers
with ``network_mode: host``, pods with ``hostNetwork``, cloned VMs all called
``localhost``), and PIDs repeat across PID namespaces. The kernel's boot id and the
inode of this process's PID namespace tell two such processes apart, so
``dead_here`` only ever judges a holder that runs under the same kernel and in the
same PID namespace as the caller, where ``kill(pid, 0)`` means what it says.
"""

from __future__ import annotations

import os
import socket
import uuid
from functools import lru_cache

__all__ = ["dead_here", "owner_id"]


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


@lru_cache(maxsize=1)
def _namespace_tag(pid: int) -> str:
    """``<boot id prefix>.<pid namespace inode>`` of this process ("?" for what is unknown)."""
    boot = _read("/proc/sys/kernel/random/boot_id").replace("-", "")[:12] or "?"
    try:
        pidns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pidns = "?"
    return f"{boot}.{pidns}"


def owner_id() -> str:
    """A new owner string for this process (one per worker, sweep or finalizer)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_namespace_tag(os.getpid())}.{uuid.uuid4().hex[:6]}"


def dead_here(owner: str) -> bool:
    """Whether ``owner`` is a process of this host, kernel and PID namespace that is gone."""
    host, _, rest = owner.partition(":")
    pid_text, _, tag = rest.partition(":")
    mine = _namespace_tag(os.getpid())
    if host != socket.gethostname() or not pid_text.isdigit() or "?" in mine:
        return False
    if tag.rpartition(".")[0] != mine:
        return False  # another kernel or PID namespace: its PIDs mean nothing here
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
