"""Maintenance scripts of crocodil (python -m scripts.NAME): behaviour fingerprints, the GPU check, set-up."""
