"""One port, shared by the listener processes of one node and refused to any other node.

With ``[node] listeners`` above 1 every listener process binds the DICOM port with
``SO_REUSEPORT``, and Linux spreads new connections over them. The kernel lets any process of
the same user that also sets the option join the port, so a second dicom-node (another data
directory, another database) started on the same port would silently take part of the
first one's traffic. ``PortShare`` closes that gap: before binding a shared port a listener
claims it in a lock file, ``<lock dir>/dicom-node-<uid>-port-<port>.lock``:

- the first claimant finds the file unlocked, writes its node's identity (a hash of the
  database URL and the resolved data directory, never the URL itself: it may carry a
  password) and holds a shared ``flock`` for its life;
- later claimants of the same node (same identity) take a shared lock too;
- a claimant of another node finds the file locked with another identity and is refused with
  one line naming the other node's data directory.

The kernel drops a process's locks when it dies, however it dies, so a killed listener never
leaves a stale claim. Claims are made under a second lock (``...lock.guard``) so that two
claimants never both think they are first. Processes of different users cannot share a port
with ``SO_REUSEPORT`` at all (the kernel refuses the bind), hence one file per user. The lock
directory is ``/run/lock`` where writable (shared by every service of the host, unlike a
service's private ``/tmp``), else the temporary directory.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from pathlib import Path

from dicom_node.stages import StageConfigError


def lock_dir() -> Path:
    run_lock = Path("/run/lock")
    if run_lock.is_dir() and os.access(run_lock, os.W_OK | os.X_OK):
        return run_lock
    return Path(tempfile.gettempdir())


def node_identity(database_url: str, data_dir: Path) -> str:
    """What makes two listener processes the same node: one database and one file store (hex)."""
    text = f"{database_url}\n{Path(data_dir).resolve()}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class PortShare:
    """A claim on ``port`` for the node ``identity`` (see the module doc); held until ``release``.

    ``label``: what the refusal of another node names (its data directory).
    """

    def __init__(self, port: int, identity: str, label: str, directory: Path | None = None):
        self.port, self.identity, self.label = port, identity, label
        self.path = (directory or lock_dir()) / f"dicom-node-{os.getuid()}-port-{port}.lock"
        self._fd: int | None = None

    def claim(self) -> None:
        """Claim the port or raise ``StageConfigError`` when another node shares it."""
        guard = os.open(f"{self.path}.guard", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held by live listeners: of this node?
                holder = os.pread(fd, 4096, 0).decode(errors="replace").split("\n", 1)
                if holder[0].strip() != self.identity:
                    os.close(fd)
                    other = holder[1].strip() if len(holder) > 1 else "unknown"
                    raise StageConfigError(
                        f"port {self.port} is already shared by the listeners of another dicom-node "
                        f"(data directory {other}); give this node another [node] port") from None
            else:  # the first claimant: say whose port it is
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{self.identity}\n{self.label}\n".encode(), 0)
            fcntl.flock(fd, fcntl.LOCK_SH)  # under the guard: nobody claims in between
            self._fd = fd
        finally:
            os.close(guard)  # drops the guard lock

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
