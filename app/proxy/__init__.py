"""OpenAI-compatible logging proxy: answers from the serving snapshot and records the trace."""
