"""Benchmarks behind bench.py: training and inference speed, the data path at scale, and the nuclei experiment."""
