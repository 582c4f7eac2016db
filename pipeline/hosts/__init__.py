"""The Docker engines pipeline deploys to: `engine` (connection, images, pulls, pushes,
builds) and `containers` (pipeline's container specs and their translation to Docker's API).
The only folder that imports the docker SDK (besides the lab); every SDK error leaves it as a
pipeline error kind naming the host.

Importing this package defers paramiko (see `_Deferred`) before anything here imports the SDK.
"""

from __future__ import annotations

import importlib
import sys
import threading
import types
from typing import Any


class _Deferred(types.ModuleType):
    """A stand-in in `sys.modules` that imports the real module on its first attribute use.

    The docker SDK (7.x, `docker/transport/sshconn.py`) imports paramiko when it is imported,
    yet uses it only to open an ssh:// connection itself; pipeline always shells out to `ssh`
    (`use_ssh_client=True`, `hosts/sshpool.py`), so paramiko and what it pulls in (cryptography,
    nacl, invoke: ~150 modules, about 0.2 s on a 2-core machine) are never used. Every command
    paid for them before it did anything, a rollback included. The stand-in keeps `import
    paramiko` working; any attribute read loads and returns the real one, so code that does use
    paramiko (another library in the same process) gets it unchanged."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__lock = threading.Lock()

    def __getattr__(self, attr: str) -> Any:
        with self.__lock:
            if sys.modules.get(self.__name__) is self:
                del sys.modules[self.__name__]
            real = importlib.import_module(self.__name__)
        return getattr(real, attr)


def _defer(name: str) -> None:
    """Put a `_Deferred` stand-in for `name` in `sys.modules` unless it is imported already."""
    sys.modules.setdefault(name, _Deferred(name))


_defer("paramiko")
