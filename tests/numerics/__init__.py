"""Tests of the reference numerics (hf_nvfp4.numerics) against an independent oracle."""
