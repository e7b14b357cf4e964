"""The eagle drafter: an EAGLE-3-style draft layer (model.py) and its tree drafting (drafter.py)."""
