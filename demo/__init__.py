"""eardrum.demo: the demo application (real weights fetched, trained and measured) and the smoke run."""
