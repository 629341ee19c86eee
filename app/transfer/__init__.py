"""Import and export of traces in the formats other tools use."""
