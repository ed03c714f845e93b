"""LoRA adapters as data: the device-resident pool, PEFT directory I/O, and functional (hook-based) LoRA."""
