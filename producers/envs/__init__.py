"""Environments for general agents (terminal, tool-call, SWE, GUI) and what they need: a
sandbox for code and shell (`sandbox`)."""
