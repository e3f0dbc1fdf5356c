"""The formats: one file each, found by passes/quant/registry.py. A file
defines `FORMATS`, a tuple of WeightFormat and/or KVFormat objects."""
