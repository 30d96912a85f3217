"""Evaluation of frozen features: extraction, k-NN, linear probes, few-shot, attention maps."""
