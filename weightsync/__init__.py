"""The torch half of the weight-sync contract, shared by the learner (sender) and the generation workers
(receiver), which never import each other. `broker/schemas.py` holds the wire half (BucketSpec, TensorSpec,
WeightAnnouncement) and stays free of torch; this package may import torch and `broker`, nothing else.
"""
