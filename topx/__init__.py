"""topx: batch top-x recommendations with a factorization machine and exact inner-product search."""

__version__ = "0.1.0"
