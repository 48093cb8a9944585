"""Shared kernel of emrwatch: the canonical access event, hospital context and time helpers.

Every other package (connectors, detectors, models, pipeline) depends on this one and
nothing here depends on them.
"""

__version__ = "0.1.0"
