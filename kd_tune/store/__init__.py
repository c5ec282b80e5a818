"""Shared storage: a path, NFS or S3 behind one `Storage`, and the signed checkpoints written to it.

Besides the foundation modules at the package's top, it may import only these layers.
"""

MAY_IMPORT = ()
