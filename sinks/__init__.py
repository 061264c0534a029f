"""Beam sinks of this project. The Tinybird Events API sink lives in :mod:`sinks.tinybird`."""
