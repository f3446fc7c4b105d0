"""On-disk formats the zoo reads and writes (PEFT adapter folders, safetensors headers)."""
