"""Helpers of the runtime."""
