"""Users' own data files (see formats.py)."""
