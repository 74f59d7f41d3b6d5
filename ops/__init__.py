"""Operator tools: database migrations, toolbox registration and credentials. Not imported by functions."""
