"""The blockcrypt key vault: an HTTPS service that speaks the Azure Key Vault
keys REST API, so that the official Azure SDK (and the blockcrypt KEK provider)
can talk to it exactly as to a real Azure Key Vault.

- ``client``  a small reusable REST client (token fetch, get/wrap/unwrap, admin ops)
- ``admin``   vault administration on its host (``init_vault``)
- ``server``  the service and everything behind it (store, key operations,
              identities, policies, audit, TLS material, HSM-backed keys)

Its command line is cli/vault.py (``blockcrypt vault``).

Caveats: one vault per directory; the service is a single process with one
SQLite connection behind a lock, built for correctness and tests, not for
thousands of requests per second.
"""
