"""Plumbing below the idea: run folder, readers, speed paths, distributed setup, CLI checks."""
