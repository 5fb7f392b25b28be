"""Engines run one round's client updates; they differ in how, never in the result."""
