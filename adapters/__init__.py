"""eardrum.adapters: the audio adapter model (encoders, projectors, merge, checkpoints)."""

__version__ = "0.1.0"
