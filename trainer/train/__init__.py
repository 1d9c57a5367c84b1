"""Stage 3: one LoRA expert per skill, trained with accelerate."""
