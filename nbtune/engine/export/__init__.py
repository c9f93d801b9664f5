"""A model out of nbtune: the adapter merged into its base (`merging.py`), written as safetensors or one GGUF
file (`exporting.py`, read first; `gguf_file.py`, `gguf_vocab.py`, and `gguf_check.py`, which reads it back and
compares), Ollama's Modelfile (`modelfile.py`), and accelerate configs and rerun scripts (`launch_files.py`).

May import: nbtune.config, methods, and engine.bases, records, evaluation, compute; the `gguf` package.
"""
