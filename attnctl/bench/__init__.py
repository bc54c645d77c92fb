"""Benchmarks that the `attnctl bench` commands and the scripts in `benchmarks/` share: DraftAttention's
kernels and end-to-end speed (`draft`), the cost of perturbed-branch guidance (`pag`). They print and
return reports; they never import the command line. The testbed's benchmarks live in `attnctl.testbed`."""
