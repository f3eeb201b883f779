"""Image processor, `LaVITProcessor` and pipelines (remote-code folder: flat files, relative imports only)."""
