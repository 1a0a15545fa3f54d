"""Experiments over many runs: seed sweeps, whole-split statistics, the `emimimic table` command.

``stats`` holds the numbers (per-target Pearson over a split, mean ± std over seeds, the paired
bootstrap interval of a difference); ``table`` runs every config × seed through the ``emimimic``
CLI and writes the CSV, the Markdown table and the PNG.
"""
