"""Pure domain: no I/O, clock and ids injected."""
