"""The diffusion maths: noise schedules, the samplers that walk them, and choosing their steps.

schedule.py   NoiseSchedule: betas, alpha_bar, sigmas and the spacing of sampling timesteps
samplers.py   DDIM and DDPM, each an explicit loop over the schedule's timesteps; guidance and noise
ode.py        the ODE samplers in sigma space (Euler, Heun, DPM-Solver++(2M), ...) and their step sigmas
registry.py   the one table of every sampler and sigma family, and `sample`, which dispatches to them
tune.py       sigmas and a guidance interval tuned on a user's model (`diffcli tune`)
"""
