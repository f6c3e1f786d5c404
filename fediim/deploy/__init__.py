"""Local deployment: a whole federation (SuperLink, SuperNodes, TLS) on one machine."""
