"""Crash safety: dead-run detection, one writer per output, fault injection for the tests."""
