"""Debian's `chromium` for the browser tests: installed when missing, the way slurm_cluster.py installs Slurm."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from megatron_lomdm.tracking.ui import find_chromium

PACKAGES = ("chromium",)
INSTALL_LOCK = Path(tempfile.gettempdir()) / "lomdm-chromium-install.lock"


class BrowserUnavailable(RuntimeError):
    """Chromium cannot be installed here; the message says why (used as a skip reason)."""


def ensure_chromium(timeout: float = 900.0) -> str:
    """The browser's path, after `apt-get install chromium` when it is missing (root only).

    Raises:
        BrowserUnavailable: with the reason, when it is missing and cannot be installed.
    """
    found = find_chromium()
    if found:
        return found
    if os.geteuid() != 0:
        raise BrowserUnavailable(f"Chromium is not installed ({' '.join(PACKAGES)}) and this is not root")
    if shutil.which("apt-get") is None:
        raise BrowserUnavailable("Chromium is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300", *PACKAGES]
    with open(INSTALL_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if find_chromium():
            return find_chromium()
        out = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:  # a fresh machine has no package lists yet
            upd = subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=timeout)
            out = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
            if out.returncode != 0:
                raise BrowserUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: "
                                         f"{(upd.stderr + out.stderr)[-1500:]}")
    found = find_chromium()
    if found is None:
        raise BrowserUnavailable("apt-get installed chromium but no browser binary is on PATH")
    return found
