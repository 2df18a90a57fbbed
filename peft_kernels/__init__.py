"""peft_kernels: kernel-accelerated parameter-efficient fine-tuning over 4-bit bases."""
__version__ = "0.1.0"
