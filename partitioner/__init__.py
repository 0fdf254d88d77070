"""Planning: feasibility rules, policies and their registry, fluid bound, peak search, replanning.

Pure functions of their inputs: no clock, no I/O beyond reading profile files on request.
"""
