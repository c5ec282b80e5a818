"""The Ray layer, the only folder that imports Ray: the sweep, its trials, TensorBoard, the console and
the benchmarks.

Besides the foundation modules at the package's top, it may import only these layers.
"""

MAY_IMPORT = ('store', 'audio', 'datasets', 'training', 'deploy', 'evaluation')
