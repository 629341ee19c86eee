"""Receivers: shells that turn what teams already export into our traces and outcomes."""
