"""accelerate launch configs (YAML)."""
