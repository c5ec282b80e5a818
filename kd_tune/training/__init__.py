"""Teachers, students and the distillation loop, which knows nothing about Ray (`fit(config, report)`).

Besides the foundation modules at the package's top, it may import only these layers.
"""

MAY_IMPORT = ('store', 'audio', 'datasets')
