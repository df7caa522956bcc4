"""Make plain ``lm_eval --model hf-regions`` work: lm-eval 0.4.13 has no plugin discovery.

``pip install`` puts ``lmeval_regions_lm_eval.pth`` in site-packages (see
:mod:`lmeval_regions._pth_build`); at interpreter start-up it calls :func:`install`, which only
adds a finder to ``sys.meta_path`` (no lm-eval or torch import: start-up stays fast). When
``lm_eval.api.registry`` is later imported by anyone, the finder runs the real module and then
registers ``hf-regions`` *lazily* (a ``"module:Class"`` placeholder, as lm-eval does for its own
models), after importing ``lm_eval.models`` so the built-ins (``hf``, ...) are registered first:
``get_model`` only imports them when the registry is empty, so registering ours alone would hide
them. Set ``LMEVAL_REGIONS_NO_HOOK=1`` to disable.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

TARGET_MODULE = "lm_eval.api.registry"
MODELS = {"hf-regions": "lmeval_regions.eval.model:HFRegionsLM"}


def register() -> None:
    """Register our models in lm-eval's registry (idempotent; built-ins first)."""
    import lm_eval.models  # noqa: F401  (registers the built-in placeholders)
    from lm_eval.api.registry import model_registry

    for name, target in MODELS.items():
        if name not in model_registry:
            model_registry.register(name, target=target)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        _Finder.remove()
        try:
            register()
        except Exception as e:  # never break lm-eval itself because of the plugin
            print(f"[lmeval-regions] could not register hf-regions with lm-eval: {e!r}",
                  file=sys.stderr)


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``lm_eval.api.registry`` once, then removes itself."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec

    @staticmethod
    def remove() -> None:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]


def install() -> None:
    """Called from the ``.pth`` file at start-up."""
    if os.environ.get("LMEVAL_REGIONS_NO_HOOK"):
        return
    if TARGET_MODULE in sys.modules:  # already imported (e.g. install() called late)
        register()
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
