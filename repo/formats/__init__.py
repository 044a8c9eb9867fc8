"""Strict readers for field formats (MRC, STAR, tilt metadata) that hand out numpy arrays and plain values."""
