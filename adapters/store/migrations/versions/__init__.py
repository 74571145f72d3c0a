"""Migration scripts, oldest first (``NNNN_what.py``)."""
