"""eardrum.training: recipes, feature cache, LoRA/QLoRA, the loop under accelerate, distillation."""
