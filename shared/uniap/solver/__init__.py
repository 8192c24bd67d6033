"""The MIQP per subproblem and the unified optimization process over them."""
