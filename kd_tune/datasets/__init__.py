"""Data sets on disk: the manifest and its splits, synthetic speech and negatives, a user's recordings.

Besides the foundation modules at the package's top, it may import only these layers.
"""

MAY_IMPORT = ('store', 'audio')
