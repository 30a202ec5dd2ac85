"""Helpers shared by the tests and the benchmarks (bench/ imports them from here;
tests never import bench/, except tests/bench/, which tests the campaigns)."""
