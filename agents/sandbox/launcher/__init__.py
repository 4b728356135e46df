"""The launcher that runs as PID 1 of each run: a package of the standard library only, run as
a directory (`python -I -S -B .../launcher CONFIG`); see `run.py`. The parent imports `kernel`."""
