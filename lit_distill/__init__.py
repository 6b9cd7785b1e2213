"""lit_distill."""
