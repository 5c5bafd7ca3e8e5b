"""Ready model configs (YAML)."""
