"""`zimage batch`: one job per row of a CSV or JSONL file, rendered from a template, resumable.

rows (reading the file) → plan (each row's values and file name) → runner (jobs on a backend, files
written once, a manifest line per row) → backends (the local engine, or any ComfyUI server).
"""
