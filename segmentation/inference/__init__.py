"""Inference and export: whole images predicted by tiles, image files segmented, models exported."""
