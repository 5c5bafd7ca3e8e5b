"""eardrum.training: data, recipes, LoRA/QLoRA and accelerate."""
