"""Local development stack: stand-ins for the pieces that normally run on remote machines."""
