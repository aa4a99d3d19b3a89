"""Leaf helpers shared by every layer: atomic files, base64url, the clock, sizes.

Caveat: nothing here imports another blockcrypt module except errors.py, so any
layer may import it.
"""
