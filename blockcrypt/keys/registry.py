"""The registry of KEK providers: a static table of built-ins, plus entry points.

A provider is named by the string recorded in each disk header's layer
(``platform``, ``vault``); the table maps it to ``module:Class``. Third-party
providers declare an entry point in the group ``blockcrypt.key_providers``
(``name = "package.module:Class"``); a built-in name cannot be taken over.

Caveat: provider modules are imported on first use, so importing the registry
never imports a provider's SDK, and providers never import the registry.
"""
from __future__ import annotations

import importlib
from importlib import metadata

from ..errors import NotFound, UsageError
from .base import KekProvider

#: provider name (as in disk headers) -> "module:Class"
BUILTIN = {
    "platform": "blockcrypt.keys.providers.platform:PlatformKeyProvider",
    "vault": "blockcrypt.keys.providers.akv:AkvKeyProvider",
    "transit": "blockcrypt.keys.providers.transit:TransitKeyProvider",
    "pkcs11": "blockcrypt.keys.providers.pkcs11:Pkcs11KeyProvider",
}
#: the scheme of a disk encryption set's key URL -> the provider that serves it
KEY_URL_SCHEMES = {
    "https": "vault",
    "transit+https": "transit",
    "transit+http": "transit",
    "pkcs11": "pkcs11",
}
ENTRY_POINT_GROUP = "blockcrypt.key_providers"


def _entry_points() -> dict[str, str]:
    try:
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # a broken distribution must not stop the built-ins
        return {}
    return {ep.name: ep.value for ep in eps if ep.name not in BUILTIN}


def provider_for_key_url(url: str) -> str:
    """The provider name of a DES key URL, by its scheme (``https://`` is the key vault)."""
    scheme = (url or "").partition("://")[0] if "://" in (url or "") else (url or "").partition(":")[0]
    name = KEY_URL_SCHEMES.get(scheme.lower())
    if name is None:
        raise UsageError(f"invalid key URL {url!r}: its scheme names no key provider "
                         f"(one of {', '.join(s + ':' for s in sorted(KEY_URL_SCHEMES))})")
    return name


def provider_names() -> list[str]:
    return sorted({*BUILTIN, *_entry_points()})


def provider_class(name: str) -> type[KekProvider]:
    target = BUILTIN.get(name) or _entry_points().get(name)
    if target is None:
        raise NotFound(kind="key provider", name=name)
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, KekProvider)):
        raise TypeError(f"{target} is not a KekProvider")
    return cls


class ProviderRegistry:
    """Provider instances for one state directory, made on first use."""

    def __init__(self, state):
        self._state = state
        self._instances: dict[str, KekProvider] = {}

    def get(self, name: str) -> KekProvider:
        inst = self._instances.get(name)
        if inst is None:
            inst = self._instances[name] = provider_class(name)(self._state)
        return inst
