"""The explicit registry of KEK providers: classes declare ``NAME`` and register.

Caveat: optional providers (vault, PKCS#11, KMS) import their SDKs lazily in
their own modules, so importing the registry never needs them.
"""
from __future__ import annotations

from ..errors import NotFound
from .base import KekProvider

_CLASSES: dict[str, type[KekProvider]] = {}


def register(cls: type[KekProvider]) -> type[KekProvider]:
    if not cls.NAME:
        raise TypeError(f"{cls.__name__} has no NAME")
    _CLASSES[cls.NAME] = cls
    return cls


def provider_names() -> list[str]:
    return sorted(_CLASSES)


class ProviderRegistry:
    """Provider instances for one state directory, made on first use."""

    def __init__(self, state):
        self._state = state
        self._instances: dict[str, KekProvider] = {}

    def get(self, name: str) -> KekProvider:
        inst = self._instances.get(name)
        if inst is None:
            cls = _CLASSES.get(name)
            if cls is None:
                raise NotFound(kind="key provider", name=name)
            inst = self._instances[name] = cls(self._state)
        return inst


# built-in providers register themselves on import
from . import platform as _platform  # noqa: E402,F401
from . import vault as _vault  # noqa: E402,F401  (imports its SDK lazily)
