"""Distributed training with GaLoreAdamW: DDP (``ddp.py``) and FSDP2 (``fsdp.py``)."""
from .ddp import register_lowrank_comm_hook

__all__ = ["register_lowrank_comm_hook"]
