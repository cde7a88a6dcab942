"""The embedded demo model: a small FLUX pipeline trained on procedural shapes."""
