"""Adapters: the database, the DTMA agent, the queue, HTTP, logging, authentication.

They import the core only.
"""
