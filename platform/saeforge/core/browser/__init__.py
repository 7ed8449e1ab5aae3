"""The feature browser (`saeforge browse`) without Ray or MLflow.

stats.py   exact, mergeable per-latent statistics (top-k contexts, quantile samples, histograms)
site.py    the static site: an overview and a page per latent (HTML, inline SVG)
"""
