"""The pipeline stages, in data-flow order: calibrate, normalize, segment (split, stitch),
features, inference, eject.

Pure array code shared by the batch path (rock crops) and the streaming path (the belt),
so that a model sees the same features in training and on the belt. Nothing here imports
the real-time side, the offline tools or the digital twin.
"""
