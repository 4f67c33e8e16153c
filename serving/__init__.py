"""The serving layer: Faust agents that score every input event with the active model.

:mod:`serving.agent` reads the input topic in micro-batches and produces predictions,
:mod:`serving.model_manager` follows the update topic and hot-swaps models,
:mod:`serving.tables` keeps serving state in changelog-backed tables, :mod:`serving.web` and
:mod:`serving.metrics` show it. Found by the App's autodiscovery.
"""
