"""Taking a model out: merged safetensors, GGUF, Ollama's Modelfile, launch files."""
