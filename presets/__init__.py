"""Shipped YAML presets (package data): `ditk presets list` shows them."""
