"""runner: packed FP16 embeddings of protein and DNA sequences on Ray, checked by an FP32 shadow."""

__version__ = "0.1.0"
