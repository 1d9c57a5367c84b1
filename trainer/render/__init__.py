"""Stage 2: one image per prompt into a dataset folder."""
