"""The speed layer: live model quality and incremental updates from labelled events.

:mod:`speed.agent` reads what serving scored, measures each version's quality and publishes
updates of the serving model on the update topic. Found by the App's autodiscovery.
"""
