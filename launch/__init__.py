"""Starts data-parallel workers with horovodrun: `python -m launch --np 2 --config FILE`."""
