"""A harder search experiment: three experts whose skills conflict (see build_models.py)."""
