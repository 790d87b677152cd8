"""The benchmark behind `python -m mtf_core bench`."""
