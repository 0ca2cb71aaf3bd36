"""Fault scenarios: the real daemon and worker processes against a private redis-server."""
