"""Generated control-API code (see scripts/gen_protos.py)."""
