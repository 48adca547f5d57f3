"""The Python files that every exported Hugging Face model directory carries.

They import only torch and transformers (never this project), so that an export runs
anywhere with ``trust_remote_code=True``. The exporter copies the files themselves; this
``__init__`` only lets the project import them for checks and tests, and is not exported.
"""
