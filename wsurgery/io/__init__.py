"""Bytes and files: safetensors headers, sharded indexes, torch pickles, atomic writers."""
