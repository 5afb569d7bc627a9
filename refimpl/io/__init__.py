"""Checkpoint I/O: the safetensors format, Hugging Face checkpoint directories, streaming.

    refimpl.io.safetensors_io   memory-mapped, validated reader and streamed, atomic writer
    refimpl.io.checkpoint       config.json + (sharded) model.safetensors: load, init, info
    refimpl.io.streaming        run a checkpoint larger than memory, one layer at a time

`refimpl.load_model(DIR)` is `refimpl.io.checkpoint.load_model`.
"""
