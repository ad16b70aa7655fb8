"""Around the stages: the run grid that Snakemake and ``semibench status`` share, where a grid
stands, and GPU slots for jobs."""
