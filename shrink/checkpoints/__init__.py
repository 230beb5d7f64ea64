"""Checkpoints: save and load (safetensors + a manifest of structural edits), the Hugging Face
folder a checkpoint is, its model card, and `python -m shrink export`."""
