"""The embedding and FP32 shadow stages: what runs inside the Ray actors (stage 3)."""
