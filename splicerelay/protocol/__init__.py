"""Pure codecs and choices, with no I/O: the PROXY protocol and the balancer."""
