"""The vault's server side: the HTTPS service and everything behind it.

- ``store``      SQLite (WAL) store, vault directory layout, master key, key material at rest
- ``tlsgen``     the vault's own CA and server certificate
- ``identities`` client id + secret identities, HMAC-signed short-lived bearer tokens
- ``policies``   per-identity key permissions (Azure access-policy names)
- ``audit``      hash-chained append-only request log, verification
- ``keyops``     the key operations themselves (Azure semantics, HTTP-free)
- ``hsm_keys``   the vault's RSA-HSM keys kept in a PKCS#11 token (premium vaults); not a
                 KEK provider of blockcrypt's own (those are in blockcrypt.keys.providers)
- ``service``    the HTTPS server: routing, api-version, auth, error bodies

Caveat: imports point one way: service -> keyops/identities/policies/audit -> store.
"""
