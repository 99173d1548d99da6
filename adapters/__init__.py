"""Adapters: the contract every executor of experiments implements, and its implementations."""
