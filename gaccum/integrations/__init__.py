"""Adapters for the frameworks people already train with. Each imports its framework lazily, so gaccum
itself needs none of them (``pip install gaccum[integrations]`` brings them)."""
