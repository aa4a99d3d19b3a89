"""The control plane: what the CLI and the mount daemon ask for, over the catalog,
the key providers and the volumes.

- ``state``     the state directory (catalog, key providers, disk files, logs)
- ``settings``  the catalog settings table (name, default, validator, help)
- ``disks``     disk life cycle: create, delete, resize, dump-key, check, open a volume, rebuild
- ``copy``      disk copy (new DEK, zero ranges stay holes)
- ``rotation``  the one re-wrap loop, and platform key rotation
- ``des``       disk encryption sets: customer-managed keys, their rotation, moving disks onto them

Caveat: front ends (cli/, mount/) import this package; nothing here imports a front end.
"""
