"""Connectors: sources of access events and context, normalised to the canonical types."""
