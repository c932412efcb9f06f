"""Hugging Face checkpoints in and out (`python -m lcjax.convert import|export`).

    pieces.py         how one lcjax parameter sits in one HF tensor (`Piece`), both directions
    architectures.py  the registry: per HF class, config.json <-> ModelConfig and the Pieces
    llama.py, mamba2.py, nemotron_h.py   the architectures
"""
