"""`lavit serve`: LaVIT behind an OpenAI-compatible API on Ray Serve (see docs/ARCHITECTURE.md, section 6)."""
