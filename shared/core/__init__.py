"""The core: what the service knows and decides, importing nothing of the project but itself."""
