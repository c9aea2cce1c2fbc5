"""Benchmarks behind `tandem bench NAME`: each module here exposes ``register(subparsers)`` for its name."""
