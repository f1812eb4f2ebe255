"""cbtlab: a Ray-distributed ablation platform for Contract-and-Broadcast Transformers.

`import cbtlab` registers the model zoo (`cbtlab.models.zoo`) with timm, without importing
torch or timm itself (the `cbtlab` command must start at once): where timm is already imported
the zoo registers now, else when timm's import finishes, through a finder on `sys.meta_path`
that wraps timm's loader. `timm.create_model("cbt_tiny_patch16_224")` then works in either order.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any

__version__ = "0.1.0"


def _register_zoo() -> None:
    import cbtlab.models.zoo  # noqa: F401  (registering is what importing it does)


class _TimmLoader(importlib.abc.Loader):
    """timm's own loader, followed by registering the zoo once timm is whole."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        _RegisterOnTimmImport.remove()
        _register_zoo()

    def __getattr__(self, name: str) -> Any:  # resource readers and the like: timm's loader's
        return getattr(self.inner, name)


class _RegisterOnTimmImport(importlib.abc.MetaPathFinder):
    """Finds timm as the other finders do and wraps its loader; stays until timm has been
    imported (a bare `importlib.util.find_spec("timm")` imports nothing)."""

    _lock = threading.Lock()

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != "timm":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _TimmLoader(spec.loader)
                return spec
        return None

    @classmethod
    def install(cls) -> None:
        with cls._lock:
            if not any(isinstance(f, cls) for f in sys.meta_path):
                sys.meta_path.insert(0, cls())

    @classmethod
    def remove(cls) -> None:
        with cls._lock:
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, cls)]


if "timm" in sys.modules:
    _register_zoo()
else:
    _RegisterOnTimmImport.install()
