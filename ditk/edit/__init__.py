"""Inversion and training-free editing (`ditk invert`, `ditk edit`).

grids      ODE grids that run in both directions (DDIM, BDIA, Euler, RF-Solver, FireFlow, RF-Inversion)
inversion  inversion methods over the sampling loop, the inversion artefact, reconstruction metrics
features   capture of attention features (q, k, v, out) per grid evaluation, on the CPU
spec       the injection spec (blocks, tensor, op, steps, tokens) and its compilation to ditk.hooks functions
editors    the edit methods (naive, tic, masactrl, rf-edit, fireflow, rf-inversion) as spec + inversion settings
preserve   structure preservation: PSNR/SSIM outside the changed strokes (masked SSIM), the changed-stroke mask
audio      audio clips in and out for audio models (the run's mel front end, autoencoder and vocoder), LSD
"""
