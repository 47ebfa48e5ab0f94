"""Inference backends behind one interface (`streamd.backends.base.Backend`); `select.make_backend` picks one.

This package's __init__ imports nothing, so `streamd.model` can use the
interface without pulling in the backends or the config.
"""
