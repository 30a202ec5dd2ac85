"""Benchmarks and reliability campaigns (run from the repository root; see the Makefile)."""
