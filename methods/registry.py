"""The method registry: a method is one module in ``methods/`` that registers its class by name.

Registration happens on import, so the registry imports every module of the package on first use (the
``locations`` idea of mmengine) instead of keeping a hand-written import list that goes stale (USB's ALL_MODULES).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Callable

from core.errors import unknown_name

if TYPE_CHECKING:
    from methods.base import SemiSupervisedMethod

_METHODS: dict[str, type["SemiSupervisedMethod"]] = {}
_NOT_METHOD_MODULES = {"base", "registry"}
_imported = False


def register(name: str) -> Callable[[type], type]:
    def decorator(cls: type) -> type:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method name '{name}' registered twice ({_METHODS[name].__module__}, {cls.__module__})")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


def _import_all() -> None:
    global _imported
    if _imported:
        return
    import methods

    for module in pkgutil.iter_modules(methods.__path__):
        if not module.ispkg and module.name not in _NOT_METHOD_MODULES:
            importlib.import_module(f"methods.{module.name}")
    _imported = True


def method_names() -> list[str]:
    _import_all()
    return sorted(_METHODS)


def get_method(name: str) -> type["SemiSupervisedMethod"]:
    _import_all()
    if name not in _METHODS:
        raise unknown_name("method", name, _METHODS)
    return _METHODS[name]
