"""Weight editors (ROME, MEMIT, FT), editing problems and metrics."""
