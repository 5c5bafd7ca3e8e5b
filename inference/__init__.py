"""eardrum.inference: chat, command line and server."""
