"""Converters from the captured IR to target artifacts, one module per target."""
