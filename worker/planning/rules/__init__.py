"""Mapping rules: declarative (match and templates) and plug-in, compiled once into a rule set."""
