"""Reading and preparing input: find and stream records, clean, tokenize, pack (stages 1-2)."""
