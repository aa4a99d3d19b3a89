"""The built-in KEK providers, one module each (listed in keys/registry.py).

- ``platform``  platform-managed keys: the key store in the state directory (AES-256-GCM wrap)
- ``akv``       customer-managed RSA keys in an Azure-Key-Vault-compatible vault (RSA-OAEP-256);
                its provider name in disk headers is ``vault``
- ``transit``   customer-managed keys in an OpenBao/HashiCorp Vault transit engine (derived AES-GCM)
- ``pkcs11``    AES-256 keys in a PKCS#11 token (RFC 7512 URIs): DES keys, and the platform key store's
                token backend (platform.py)

Caveat: a provider module imports its SDK lazily, so listing providers needs none of them.
"""
