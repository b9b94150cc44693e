"""Attention kernels and FP32-accurate products from tensor cores (they import no model)."""
