"""Use cases: one module per function, plus what several of them share.

They import adapters and the core, never each other (import-linter checks it).
"""
