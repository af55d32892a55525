"""The resident memory each top-level package's imports add to a process, measured from inside it.

Imported first thing (before anything it should measure), it wraps every module loader that
sys.meta_path finds: each module's execution is charged the VmRSS it adds less what the modules it
imports add (charged to them), per top-level package, in the order the packages first load. A C
extension's shared library loads before its module executes: the package that imports it is charged.
At exit it writes {"start_mb", "end_mb", "packages": [[name, mb, modules], ...]} to $IMPORT_RSS_OUT.
footprint_bench.py runs the idle agent with it (`details.idle_imports`):

    python -c "import sys; sys.path.insert(0, 'benchmarks'); import import_rss; ..."
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


_charged: dict[str, list[int]] = {}  # package -> [bytes, modules], in first-load order
_open: list[list[int]] = []  # per module executing: [bytes its own imports added]


class _Measured(Loader):
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self.loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        start = rss_bytes()
        _open.append([0])
        try:
            self.loader.exec_module(module)
        finally:
            nested = _open.pop()[0]
            added = rss_bytes() - start
            entry = _charged.setdefault(module.__name__.partition(".")[0], [0, 0])
            entry[0] += added - nested
            entry[1] += 1
            if _open:
                _open[-1][0] += added


class _Finder(MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec: ModuleSpec | None = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Measured(spec.loader)
                return spec
        return None


_START = rss_bytes()
sys.meta_path.insert(0, _Finder())


@atexit.register
def _write() -> None:
    out = os.environ.get("IMPORT_RSS_OUT")
    if out:
        packages = [[name, b / MIB, n] for name, (b, n) in _charged.items()]
        with open(out, "w") as f:
            json.dump({"start_mb": _START / MIB, "end_mb": rss_bytes() / MIB, "packages": packages}, f)
