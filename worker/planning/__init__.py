"""Event to routed targets: the rules, their templates, zone routing, and the planner (inline
or in a second process)."""
