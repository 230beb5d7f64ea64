"""`id`: STAT's interpolative-decomposition pruning of FFN neurons and attention heads or value
dims, the interpolation folded into the next layer (`method.py`); its attention units
(`attention.py`), query/key thinning (`qk.py`) and keys (`config.py`)."""
