"""The mount: the daemon that serves a state directory's disks over FUSE, its front
ends and its plugins.

- ``daemon``     mount, umount, status, and the daemon process (``python -m blockcrypt.mount``)
- ``fusepy_fs``  the fusepy front end (libfuse 2): the FUSE operations over volumes
- ``monitor``    the key monitor plugin: revocation and auto-rotation inside the daemon

Caveat: the only package that imports a FUSE binding.
"""
