"""Datasets on disk: layouts, indexing, grouped splits, the decoded-image cache, dedup, audit, synthetic data."""
