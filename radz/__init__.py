"""Helpers that never travel inside a checkpoint: datasets, knowledge, evaluation, baselines, phantoms."""
