"""Models behind one interface (`base.py`): ESM-2 (`esm2.py`) and DNABERT-S/-2 (`dnabert.py`)."""
