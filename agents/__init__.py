"""Stratum's Faust agents, tables and web views, found by the App's autodiscovery."""
