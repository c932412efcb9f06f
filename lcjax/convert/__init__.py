"""Hugging Face checkpoints in and out (`python -m lcjax.convert import|export`).

    pieces.py         how one lcjax parameter sits in one HF tensor (`Piece`), both directions;
                      `Architecture`: a config.json mapping and the Piece of every parameter
    hf_config.py      reading config.json strictly (every field mapped, harmless or refused)
    llama.py, mamba2.py, nemotron_h.py   the architectures; architectures.py: their registry
    params.py         parameters from HF tensors (streamed into their shardings) and back
    safetensors_io.py reading (row slices, no pickles) and writing (sharded, with an index)
    hf_import.py, hf_export.py, model_gin.py, __main__.py   the workdir <-> HF directory steps
"""
