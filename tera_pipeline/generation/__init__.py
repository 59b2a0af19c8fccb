"""Block-wise diffusion sampling: schedule, patch lattice blending, the block step, seams, the job
lifecycle, the pyramid.
"""
