"""The embedded demo: scikit-learn's bundled digits, tiny VAR / DiT families, a digits classifier as feature net."""
