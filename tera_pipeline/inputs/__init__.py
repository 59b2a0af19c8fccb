"""A user's cells and transcripts (or the synthetic brain) read, checked, partitioned by block and
binned into conditioning.
"""
