"""Runs and figures: run folders, metrics.csv and curves, and the diagnostics of test.py."""
