"""ODE samplers in sigma space (Karras et al. 2022; DPM-Solver++, Lu et al. 2022)."""

SAMPLERS: tuple[str, ...] = ()
