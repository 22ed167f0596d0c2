"""Frozen-encoder evaluation: kNN, linear and segmentation probes on extracted features."""
