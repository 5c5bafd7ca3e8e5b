"""eardrum.cli: the `eardrum` command (`eardrum.cli.main.main`; also `python -m eardrum.cli`)."""
