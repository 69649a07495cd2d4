"""Evaluation of synthetic volumes: metrics with a stated data range, and the `evaluate`, `segmentation` and
`memorization` command-line tools."""
