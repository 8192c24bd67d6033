"""Cost model: strategies and capabilities, per-layer costs, subproblem tables, plan evaluation."""
