"""Relative numerical tolerances, named once so each comparison says which kind of slack it allows."""

# A sum of byte or second terms within this of a bound is at the bound (floating-point rounding).
ROUNDING = 1e-9
# A plan whose predicted memory is at its capacity up to the solver's rounding still fits.
MEMORY_FIT = 1e-6
# Slack on an objective cutoff taken from an incumbent, so the solver's own rounding cannot cut the incumbent.
CUTOFF_SLACK = 1e-7
# Two objectives this close are the same plan value (an incumbent meeting a subproblem's lower bound).
SAME_OBJECTIVE = 1e-12
# A relative optimality gap below this is zero: SCIP's bounds carry its feasibility tolerance (numerics/feastol
# 1e-6), so a search asked for --gap 0 that proved optimality still reports a gap of that order.
SOLVER_GAP = 1e-6
