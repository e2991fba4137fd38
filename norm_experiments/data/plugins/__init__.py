"""The built-in dataset layouts and generated datasets: one module each, registering its LayoutRecord
(data/registry.py). These modules import no torch or nibabel: each names its code by import path."""
