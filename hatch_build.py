"""Build hook: compile the compare kernel's fused pass (``wsurgery/compare/_fused.c``) into a
plain shared library beside its source, for wheels and editable installs alike.

The library is loaded with ``ctypes`` (``wsurgery/compare/fused.py``): no Python headers,
no Python API. Without a working C compiler the install still succeeds, with a warning,
and wsurgery runs the numpy passes instead (the same results, slower).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface
except ImportError:  # imported as a plain module: benchmarks/bench.py builds a baseline tree's library
    BuildHookInterface = object  # type: ignore[assignment,misc]

SOURCE = Path("wsurgery", "compare", "_fused.c")
LIBRARY = SOURCE.with_name("_fused.dll" if sys.platform == "win32" else "_fused.so")  # as fused.library_path()
# Exact IEEE arithmetic: no fast-math, no FMA contraction (the results must be numpy's to the bit).
FLAGS = ["-std=gnu11", "-O3", "-fno-fast-math", "-ffp-contract=off", "-fPIC", "-shared"]


def compilers() -> list[list[str]]:
    """C compilers to try, in order: $CC, the one Python was built with, cc, gcc, clang."""
    found = []
    for spec in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        argv = shlex.split(spec) if spec else []
        if argv and shutil.which(argv[0]) and argv not in found:
            found.append(argv)
    return found


def build_library(root: Path) -> tuple[Path | None, str]:
    """Compile the library into the source tree: ``(path, "")``, or ``(None, why)``."""
    src, out = root / SOURCE, root / LIBRARY
    tried = compilers()
    if not tried:
        return None, "no C compiler found (set CC, or install cc)"
    errors = []
    for cc in tried:
        # build beside the target and rename: a half-written library is never loaded
        fd, tmp = tempfile.mkstemp(prefix="._fused-", suffix=out.suffix, dir=out.parent)
        os.close(fd)
        try:
            proc = subprocess.run([*cc, *FLAGS, "-o", tmp, str(src), "-lm"], capture_output=True, text=True)
            if proc.returncode == 0:
                os.chmod(tmp, 0o755)  # mkstemp made it private: the library is read by its users
                os.replace(tmp, out)
                return out, ""
            errors.append(f"{shlex.join(cc)}: {proc.stderr.strip()[-500:]}")
        except OSError as e:
            errors.append(f"{shlex.join(cc)}: {e}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return None, "; ".join(errors)


class FusedKernelHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel":
            return
        lib, why = build_library(Path(self.root))
        if lib is None:
            self.app.display_warning(f"wsurgery: the fused compare kernel was not built ({why}); diffs use numpy")
            return
        # a platform wheel (the library is machine code) for any Python 3: it uses no Python API
        build_data["pure_python"] = False
        build_data["tag"] = "py3-none-" + sysconfig.get_platform().replace("-", "_").replace(".", "_")
        if version != "editable":  # editable installs import from the source tree, where it is
            build_data["force_include"][str(lib)] = LIBRARY.as_posix()
