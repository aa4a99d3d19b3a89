"""Benchmarks: fio jobs run against blockcrypt and its peers (see docs/BENCHMARKS.md).

``bench/run.py`` is the entry point; ``systems`` holds one class per system under
test, ``jobs`` the fio job matrix, ``report`` the RESULTS.md and plot writers.

Caveat: these modules shell out to fio, gocryptfs, qemu and the blockcrypt CLI
and mount file systems; they are meant to run as root on a test host.
"""
