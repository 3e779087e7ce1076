"""codelupe-trainer: keeps a LoRA adapter of a code model fine-tuned on new rows from PostgreSQL."""

__version__ = "0.1.0"
