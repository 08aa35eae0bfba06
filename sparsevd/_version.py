"""The version of sparsevd (read by setup.py too)."""
__version__ = "0.1.0"
