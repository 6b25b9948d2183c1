"""Model definitions: the AQ-VAE tokenizer and the next-acceleration-scale transformer.

`layers` holds the shared VAR VQ-VAE building blocks (var_spec.md §1.2); `autoencoder` the FiLM
encoder and the decoder with VAR's topology and parameter names (var_spec.md §1.3, §1.4, §1.7,
§6.2; decisions.md §3).
"""
