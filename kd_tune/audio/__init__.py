"""Audio in and out: bounded file reading and resampling, log-mel features, training augmentation
(torch) and the evaluation's acoustic conditions (numpy).

Besides the foundation modules at the package's top, it may import only these layers.
"""

MAY_IMPORT = ()
