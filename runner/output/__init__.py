"""Writing, resume and the manifest (stage 4), and reading results back."""
