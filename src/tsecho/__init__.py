"""tsecho: a timestamp echo daemon (tsechod) and its client (tsecho)."""

__version__ = "0.1.0"
