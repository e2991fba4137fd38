"""The built-in networks: one module per model, each registering its ModelRecord (models/registry.py). These
modules import no torch: each names its network's code by import path."""
