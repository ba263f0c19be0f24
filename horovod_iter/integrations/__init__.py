"""Integrations with other libraries, at the top of the stack (nothing below imports them)."""
