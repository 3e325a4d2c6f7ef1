"""Register the ``"hf_nvfp4"`` quantization method with transformers without importing it.

``import hf_nvfp4`` must not import transformers (a torch-only core, and a fast CLI), yet a
user who imported ``hf_nvfp4`` expects ``from_pretrained(..., quantization_config=
NVFP4Config())`` and checkpoints whose ``config.json`` says ``quant_method: "hf_nvfp4"`` to
work, whichever of the two packages was imported first. transformers reads its quantization
methods from two dicts in ``transformers.quantizers.auto``, so :func:`install` keeps this
invariant: *whenever that module has been executed, ``"hf_nvfp4"`` is in its dicts.*

- If the module is already imported, :func:`install` registers at once.
- Otherwise it puts a finder on ``sys.meta_path`` that wraps the module's loader: the
  registration runs right after the module's own code, inside the same import, before any
  caller can read the dicts; the finder then removes itself.

Registering only when ``NVFP4Config`` is first accessed would not be enough: a checkpoint
saved with it names the method in its ``config.json`` and never touches ``hf_nvfp4.config``.
Hooking ``transformers`` itself would be too early (its ``__init__`` is lazy and the
quantizers are not there yet), and hooking ``transformers.modeling_utils`` would miss code
that uses ``AutoHfQuantizer``/``AutoQuantizationConfig`` directly.

transformers 5 imports ``transformers.quantizers.auto`` lazily, typically from inside the
import of ``transformers.modeling_utils`` (via an integration that imports
``transformers.quantizers.quantizers_utils``), so the registration runs while that module
and ``transformers.quantizers`` are only partly initialized: :mod:`hf_nvfp4.hf_quantizer`
therefore imports only fully executed transformers modules at module level
(``transformers.quantizers.auto``/``.base`` and ``transformers.utils.quantization_config``).
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

TARGET = "transformers.quantizers.auto"


def _register() -> None:
    module = sys.modules.get(f"{__package__}.hf_quantizer")
    if module is not None and not hasattr(module, "register"):
        # hf_quantizer is mid-import (its own transformers import ran the target): it
        # registers at its end.
        return
    from .hf_quantizer import register

    register()


class _RegisteringLoader(importlib.abc.Loader):
    """The target module's own loader, followed by the registration."""

    def __init__(self, loader: importlib.abc.Loader, finder: _Finder) -> None:
        self._loader = loader
        self._finder = finder

    def __getattr__(self, name: str) -> Any:
        # get_source, get_filename, is_package, ... (while the module runs): the wrapped one's.
        return getattr(self._loader, name)

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        """The wrapped loader's module (None: the default module)."""
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        """Run the module, then register ``"hf_nvfp4"`` in its dicts and drop the finder."""
        self._loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self._loader  # leave no trace
        _register()
        self._finder.remove()


class _Finder(importlib.abc.MetaPathFinder):
    """Finds ``transformers.quantizers.auto`` through the other finders; wraps its loader."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        """The other finders' spec of the target, with a registering loader; None otherwise."""
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisteringLoader(spec.loader, self)
                return spec
        return None

    def remove(self) -> None:
        """Take this finder off ``sys.meta_path`` (its work is done)."""
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> None:
    """Make sure ``"hf_nvfp4"`` is registered whenever transformers' quantizer dicts exist.

    Registers now when ``transformers.quantizers.auto`` is already imported; otherwise
    installs a one-shot import hook that registers right after it is. Idempotent.
    """
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
