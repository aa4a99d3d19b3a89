"""The blockcrypt key vault: an HTTPS service that speaks the Azure Key Vault
keys REST API, so that the official Azure SDK (and the blockcrypt KEK provider)
can talk to it exactly as to a real Azure Key Vault.

Modules:

- ``store``      SQLite (WAL) store, vault directory layout, master key, key material at rest
- ``tlsgen``     the vault's own CA and server certificate
- ``identities`` client id + secret identities, HMAC-signed short-lived bearer tokens
- ``policies``   per-identity key permissions (Azure access-policy names)
- ``audit``      hash-chained append-only request log, verification
- ``keyops``     the key operations themselves (Azure semantics, HTTP-free)
- ``hsm``        RSA-HSM keys kept in a PKCS#11 token (premium vaults)
- ``service``    the HTTPS server: routing, api-version, auth, error bodies
- ``client``     a small reusable REST client (token fetch, get/wrap/unwrap, admin ops)
- ``cli``        the ``vault`` click group

Caveats: one vault per directory; the service is a single process with one
SQLite connection behind a lock, built for correctness and tests, not for
thousands of requests per second.
"""
