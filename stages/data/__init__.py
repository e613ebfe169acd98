"""Datasets: on-disk layouts, label conversion, the synthetic benchmark, the dataset index."""
