"""The demo, not part of the installed product: a synthetic Higgs-schema dataset, a feed of
events at a steady rate, and the bootstrap that gives a fresh installation its first model.

``python -m demo data|bootstrap`` and ``python -m demo.feed``.
"""
