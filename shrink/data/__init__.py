"""Text and assets: the offline and hub corpora with their disjoint calibration and test parts,
files shipped inside PyPI packages, and whether a hub can be reached."""
