"""Compatibility package for the seed notebook's import line."""
