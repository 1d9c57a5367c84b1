"""Model families (SD 1.x, SD 2.x, SDXL): configs, loading, fingerprints, tiny test models."""
