"""Helpers that run real DICOM peers (Debian packages) on loopback for tests."""
