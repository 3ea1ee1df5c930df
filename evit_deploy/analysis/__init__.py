"""Seeing and checking what EViT does: token pictures, accuracy, cost and budget planning."""
