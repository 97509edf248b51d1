"""The chaos suite: the whole system as local processes, faults injected while it sends."""
