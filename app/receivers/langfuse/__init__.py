"""Langfuse ingestion API (`POST /api/public/ingestion`)."""
