"""Randomized, seeded stress runs of the whole system: quick in ``make test``, long in
``make soak``."""
