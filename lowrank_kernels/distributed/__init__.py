"""Distributed training helpers: FSDP2 sharded steps (fsdp.py)."""
