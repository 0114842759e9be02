"""Stubs generated from proto/s3net/v1/s3net.proto by tools/generate_stubs.py (do not edit)."""
