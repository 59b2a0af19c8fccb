"""What every stage shares: the job configuration, voxel geometry, noise, intensities, the error
base.
"""
