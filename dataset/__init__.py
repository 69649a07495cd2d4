"""NIfTI data pipeline: layouts, checks, geometry, intensity, cache, split, crops, the Lightning data module, the
embedded demo data set and test phantoms. Contracts: docs/ARCHITECTURE.md. Submodules are imported explicitly
(`from dataset.geometry import to_model_grid`) so the light ones (checks, io) start fast without torch."""
