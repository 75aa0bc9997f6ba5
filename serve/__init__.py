"""Serve entry points: ``serve run serve.app:app`` and ``serve deploy serve/config.yaml``."""
