"""Headless Chromium for the HTML report's tests: find it, run it bounded in time and
with no network, read back the DOM its scripts left and a screenshot (PNG decoded with
the standard library).

Chromium is the Debian package ``chromium`` (``.ci/run`` installs it when missing);
``WSURGERY_CHROMIUM`` names another binary. Without one that starts, the tests skip
with a message that says so.
"""

from __future__ import annotations

import functools
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

TIMEOUT_S = 60  # one Chromium run; a page of this size renders in about a second
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
INSTALL_HINT = (
    "install the Debian package chromium (apt-get install -y chromium; .ci/run does it) or point "
    "WSURGERY_CHROMIUM at a Chromium binary"
)


def find_chromium() -> str | None:
    named = os.environ.get("WSURGERY_CHROMIUM")
    if named:
        return shutil.which(named) or (named if os.access(named, os.X_OK) else None)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _flags(profile: str) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",  # containers run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--no-first-run",
        "--no-default-browser-check",
        "--mute-audio",
        "--hide-scrollbars",
        # no name resolves: the report is a file and must need no network at all
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",  # let the page's script finish before the dump
    ]


def run(binary: str, args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """One Chromium run with a fresh profile, killed after ``TIMEOUT_S``."""
    with tempfile.TemporaryDirectory(prefix="wsurgery-chromium-") as profile:
        return subprocess.run(
            [binary, *_flags(profile), *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            cwd=cwd,
            env={**os.environ, "HOME": profile},  # no profile or crash files in the user's home
        )


@functools.cache
def usable() -> tuple[str | None, str]:
    """``(binary, "")`` when a Chromium starts and runs a page's script, else ``(None, why)``."""
    binary = find_chromium()
    if binary is None:
        return None, f"Chromium not found: {INSTALL_HINT}"
    page = "data:text/html,<p id=x></p><script>document.getElementById('x').textContent='ran'</script>"
    try:
        proc = run(binary, ["--dump-dom", page])
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"Chromium at {binary} does not start: {exc}"
    if "ran" not in proc.stdout:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return None, f"Chromium at {binary} does not run a page (exit {proc.returncode}): {tail}"
    return binary, ""


def dump_dom(binary: str, url: str) -> str:
    proc = run(binary, ["--dump-dom", url])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def screenshot(binary: str, url: str, out: Path, size: tuple[int, int] = (1280, 1600)) -> Path:
    proc = run(binary, [f"--window-size={size[0]},{size[1]}", f"--screenshot={out}", url])
    assert proc.returncode == 0 and out.exists(), proc.stderr[-2000:]
    return out


# ------------------------------------------------------------------------------- PNG


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def read_png(path: Path):
    """An 8-bit RGB or RGBA PNG as a ``(height, width, channels)`` uint8 numpy array."""
    import numpy as np

    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, []
    width = height = bpp = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    stride = width * bpp
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        kind, line = int(raw[y, 0]), raw[y, 1:]
        if kind == 0:
            cur = line.copy()
        elif kind == 1:  # Sub: a running sum along each channel
            cur = (np.cumsum(line.reshape(width, bpp), axis=0, dtype=np.uint64) % 256).astype(np.uint8).reshape(-1)
        elif kind == 2:  # Up
            cur = line + prev
        else:  # Average, Paeth: each byte depends on the one to its left
            cur_l, up, filt = [0] * stride, prev.tolist(), line.tolist()
            for i in range(stride):
                left = cur_l[i - bpp] if i >= bpp else 0
                if kind == 3:
                    cur_l[i] = (filt[i] + ((left + up[i]) >> 1)) & 0xFF
                else:
                    cur_l[i] = (filt[i] + _paeth(left, up[i], up[i - bpp] if i >= bpp else 0)) & 0xFF
            cur = np.array(cur_l, dtype=np.uint8)
        out[y] = cur
        prev = cur
    return out.reshape(height, width, bpp)


def ink(path: Path) -> tuple[float, int]:
    """``(fraction of pixels unlike the top-left one, distinct colours)`` of a screenshot."""
    import numpy as np

    rgb = read_png(path)[:, :, :3]
    differ = np.any(rgb != rgb[0, 0], axis=2)
    colours = np.unique(rgb.reshape(-1, 3), axis=0).shape[0]
    return float(differ.mean()), int(colours)
