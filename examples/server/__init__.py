"""Example HTTP inference server for sparsekit models (see README.md)."""
