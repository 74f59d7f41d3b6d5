"""Operator tools: database migrations and toolbox credentials. Not imported by functions."""
