"""An exported model: ONNX (windowed and streaming) with its signed card, and the torch-free detector that
runs it.

Besides the foundation modules at the package's top, it may import only these layers.
"""

MAY_IMPORT = ('store', 'audio', 'datasets', 'training')
