"""A model measured: held-out audio, the condition grid, a never-trained baseline, a sweep's
leaderboard and plots, and distillation compared with training alone.

Besides the foundation modules at the package's top, it may import only these layers.
"""

MAY_IMPORT = ('store', 'audio', 'datasets', 'training', 'deploy')
