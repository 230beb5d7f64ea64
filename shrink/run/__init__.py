"""One run end to end: validation, the pipeline's stages, where the blocks live (store), resume
progress, the run folder and its lock, tracking, the closing summary, sweeps and reports."""
