"""Recipes and model configs shipped with eardrum (YAML), readable as eardrum.configs resources."""
