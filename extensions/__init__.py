"""Beyond the paper: CADD's per-token latents, App. H prompting and infilling, the Fast-dLLM decoding cache."""
