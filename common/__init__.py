"""eardrum.common: what training and inference share: records and manifests, batching, metrics, decoding."""
