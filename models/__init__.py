"""Learned scorers (river online models, scikit-learn batch models) and their registry."""
