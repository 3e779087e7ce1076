"""codelupe-trainer: keeps a LoRA adapter of a code model fine-tuned on new rows from PostgreSQL."""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes announces at import, on every CPU command, that an optional kernel from the Hugging Face hub
# is missing; nothing needs it. Filtered at its logger here, at package import, because a cycle's child
# process imports bitsandbytes before it sets up logging (logs.py drops the same line from our handler).
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward" not in record.getMessage())
