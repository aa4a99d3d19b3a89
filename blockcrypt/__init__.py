"""blockcrypt: server-side encryption of virtual disks on Linux.

Disks are sparse files whose data area is AES-256-XTS (dm-crypt aes-xts-plain64
compatible) under a per-disk data-encryption key, wrapped by a key-encryption
key from a pluggable provider. See docs/FORMAT.md and docs/KEYS.md.
"""
__version__ = "0.1.0"
