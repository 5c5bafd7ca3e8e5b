"""eardrum.inference: chat, streaming, batch generation, evaluation and the server."""
