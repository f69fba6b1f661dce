"""Tests import the pack from this checkout (see pack_import.py)."""
import pack_import  # noqa: F401
