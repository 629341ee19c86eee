"""Promotion: the gate, hot-loading into the serving engine, rollback."""
