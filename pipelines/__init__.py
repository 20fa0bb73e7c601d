"""diffusers video pipelines with vzoo sparse attention."""
