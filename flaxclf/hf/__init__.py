"""The Hugging Face boundary: config.json, checkpoints in (safetensors, msgpack, .bin) and export out."""
