"""Library imported by every function: configuration, adapters, the state machine and the use cases."""
