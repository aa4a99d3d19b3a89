"""Helpers shared by several test directories (real servers started and stopped by fixtures)."""
