"""Runnable examples of flowstate flows."""
