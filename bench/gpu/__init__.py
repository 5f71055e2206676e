"""The GPU kit (bench/gpu/README.md): run.sh and prepare.sh, and record.py for the steps' own records."""
