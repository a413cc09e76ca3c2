"""The main job: train a small LLaMA on shipped text with AdamW, galore-torch and our GaLoreAdamW.

    python -m lowrank_kernels.demo              # defaults: a few minutes on 2 CPU cores
    python -m lowrank_kernels.demo --help

model.py is the LLaMA-style decoder, data.py the corpus (Python standard-library docstrings, PSF
License) and its byte-level batches, __main__.py the training runs and the results table.
"""
