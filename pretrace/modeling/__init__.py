"""Loading Hugging Face causal LMs and choosing which of their modules influence is computed over."""
