"""Worker-process scripts for the subscriber tests, and the harness that drives them."""
